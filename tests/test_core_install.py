"""The README's first command installs the core and the postgres extra only: the tests that check a
command "works after the first command alone" run it in that environment (tests/core_install.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.core_install import blocked_modules, core_distributions, core_env


def test_core_is_read_from_the_project_metadata() -> None:
    core = core_distributions()
    assert {"qwen-edit-server", "torch", "diffusers", "fastapi", "psycopg"} <= core
    assert "pytest" not in core and "openai" not in core
    blocked = blocked_modules()
    assert {"pytest", "openai", "schemathesis"} <= blocked
    assert not {"torch", "fastapi", "httpx", "PIL", "server", "psycopg"} & blocked


@pytest.mark.e2e  # a fresh venv and the CLI in a subprocess
def test_test_only_packages_do_not_import_and_the_cli_runs(tmp_path: Path) -> None:
    env = core_env(tmp_path / "core")
    probe = "import importlib.util as u, fastapi, httpx; import openai"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "No module named 'openai' (not in the core install)" in out.stderr, out.stderr
    cli = Path(sys.executable).with_name("qwen-edit")
    out = subprocess.run([str(cli), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout
