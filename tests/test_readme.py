"""Every code block of the README works as written (tests/docblocks.py has the rule of each).

The run blocks go to the session's test server in the environment that the README's first command
installs (the test extras do not import there); the Python blocks run through pytest-examples; the
rest are parsed by their commands' own parsers."""

from __future__ import annotations

import configparser
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample

from tests.core_install import core_env
from tests.docblocks import README, Block, blocks, check_command, command_lines, rule_for, substitute
from tests.support import API_KEY

BLOCKS = blocks()


def _of(how: str) -> list[Block]:
    return [b for b in BLOCKS if rule_for(b).how == how]


def test_every_block_has_exactly_one_rule() -> None:
    assert len(BLOCKS) >= 10
    for block in BLOCKS:
        rule_for(block)  # raises, naming the block, when it has none


@pytest.mark.parametrize("block", _of("parse"), ids=lambda b: f"line{b.line}")
def test_blocks_that_cannot_run_here_still_parse(block: Block) -> None:
    if block.lang == "ini":
        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string(block.source)
        assert check_command(shlex.split(unit["Service"]["ExecStart"]))
        return
    assert block.lang in ("bash", "sh"), f"{block}: no parser for ```{block.lang}"
    syntax = subprocess.run(["bash", "-n"], input=block.source, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
    for words in command_lines(block.source):
        check_command(words)  # this project's commands, through their own parsers
        for word in words:  # and the repository's files they name exist
            if word.startswith(("docker/", "benchmarks/", "server/", "tests/")):
                assert (README.parent / word).exists(), f"{block}: {word} does not exist"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the README's: the venv at .venv (this one), a photo.jpg."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("block", _of("run"), ids=lambda b: f"line{b.line}")
def test_run_blocks_work_after_the_first_command_alone(block: Block, server: object, workdir: Path) -> None:
    rule = rule_for(block)
    source = substitute(block.source, rule, server.url, API_KEY)  # type: ignore[attr-defined]
    env = core_env(workdir / ".core")
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", source], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    shown = f"{block}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
    assert out.returncode == 0, shown
    assert rule.expect in out.stdout + out.stderr, shown


@pytest.mark.e2e
@pytest.mark.parametrize("block", _of("python"), ids=lambda b: f"line{b.line}")
def test_python_blocks_run(
    block: Block, server: object, workdir: Path, eval_example: EvalExample, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    if not (workdir / "photo.jpg").exists():  # as the Try it block makes it
        from PIL import Image

        Image.new("RGB", (640, 480), (70, 130, 220)).save(workdir / "photo.jpg")
    source = substitute(block.source, rule_for(block), server.url, API_KEY)  # type: ignore[attr-defined]
    eval_example.run(CodeExample.create(source, path=README, start_line=block.line, prefix="python"))
