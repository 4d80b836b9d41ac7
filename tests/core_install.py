"""Run a command as the README's first command installs the project: the core dependencies and the
``postgres`` extra, without the test extras.

The test venv has every extra installed, so a command that imports a test-only package (matplotlib,
openai, ...) would pass here and crash for a user. ``core_env`` gives a subprocess an environment in
which every top-level module that only a test (or other non-core) distribution provides fails to
import, exactly as it would after the first command alone. What is core is read from the installed
project's own metadata (its requirements and theirs, transitively), never from a second list.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "qwen-edit-server"
FIRST_COMMAND_EXTRAS = ("postgres",)  # README: pip install -e '.[postgres]'

_SITECUSTOMIZE = '''\
"""Written by tests/core_install.py: modules outside the core install do not import."""
import importlib.abc
import sys

_BLOCKED = frozenset({blocked})


class _CoreInstallOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the core install)", name=name)
        return None


sys.meta_path.insert(0, _CoreInstallOnly())
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions(extras: tuple[str, ...] = FIRST_COMMAND_EXTRAS) -> set[str]:
    """The distributions the first command installs: the project, its requirements with ``extras``,
    and everything those require in turn (normalised names)."""
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(PROJECT, extras)]
    while todo:
        name, wanted = todo.pop()
        key = _norm(name)
        if key in seen and not wanted:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        for spec in requires:
            req = Requirement(spec)
            environments = [{"extra": extra} for extra in (*wanted, "")]
            applies = req.marker is None or any(req.marker.evaluate(env) for env in environments)
            if applies and (_norm(req.name) not in seen or req.extras):
                todo.append((req.name, tuple(req.extras)))
    return seen


def blocked_modules(extras: tuple[str, ...] = FIRST_COMMAND_EXTRAS) -> set[str]:
    """Top-level modules that only distributions outside the core install provide."""
    core = core_distributions(extras)
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(_norm(d) in core for d in dists):
            blocked.add(module)
    return blocked - {"_distutils_hack", "pkg_resources", "setuptools", "pip"}


def core_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess of this venv's Python (or its console scripts) in which only
    the core install imports. ``folder`` receives the ``sitecustomize.py`` that enforces it."""
    folder.mkdir(parents=True, exist_ok=True)
    blocked = json.dumps(sorted(blocked_modules()))
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=blocked))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return env
