"""The README's code blocks, and what the tests do with each (tests/test_readme.py).

Every fenced block of the README must match exactly one rule of ``RULES`` (by the section it sits
under and how it starts); a block with no rule fails the suite, so a new block is tested, or says
why not, from the day it is written. What a rule does with its block:

- ``run``: the block runs, as written, in bash (``-euo pipefail``), with its placeholders filled in
  (``SUBSTITUTE``: the test server's URL and key for the README's ``127.0.0.1:8000`` and ``KEY``) and
  the rule's own quick substitutions (fewer jobs, shorter runs), in the environment that the README's
  first command installs (tests/core_install.py: the test extras do not import);
- ``python``: a Python block, run by pytest-examples with the same placeholders;
- ``parse``: the block cannot run here (it installs, serves forever, downloads 58 GB, needs a GPU or
  Docker): bash checks its syntax, and each ``.venv/bin/qwen-edit`` or ``.venv/bin/python -m ...``
  line is parsed by that command's own argument parser, so a renamed command or option fails;
- ``skip``: not a command (a diagram).

To add a block to the README: add a rule here with the reason in ``why``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)


@dataclass(frozen=True)
class Block:
    lang: str
    source: str
    line: int
    heading: str

    @property
    def first(self) -> str:
        return self.source.lstrip().splitlines()[0] if self.source.strip() else ""

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.heading!r}, ```{self.lang}: {self.first[:60]!r})"


@dataclass(frozen=True)
class Rule:
    heading: str  # a substring of the heading the block sits under
    starts: str  # the block's first line starts with this
    how: Literal["run", "python", "parse", "skip"]
    why: str
    quick: dict[str, str] = field(default_factory=dict)  # extra substitutions for a quick run
    expect: str = ""  # a run block's output must contain this


# The README's placeholders, and what a test fills in ({url}, {key}: the session's test server).
SUBSTITUTE = {
    "http://127.0.0.1:8000": "{url}",
    "Bearer anything": "Bearer {key}",
    "--key KEY": "--key {key}",
    'api_key="key1"': 'api_key="{key}"',
}

RULES = [
    Rule("qwen-edit-server", "# 1. Install", "parse", "the install itself: the suite runs from it"),
    Rule("Try it", "[ -f photo.jpg ]", "run", "the first steps: on the test server, as written", expect="completed"),
    Rule("Try it", "import wavespeed", "python", "the Python SDK on the test server"),
    Rule("How it runs", "request →", "skip", "a diagram"),
    Rule("Real weights", ".venv/bin/qwen-edit weights download edit ", "parse", "58 GB from the Hub, then serves"),
    Rule("Air-gapped", "# On a connected machine", "parse", "needs the real weights (tests/test_weights_download.py)"),
    Rule("Air-gapped", "# On the connected machine: every package", "parse", "downloads every package from PyPI"),
    Rule("Layout", "request ->", "skip", "a diagram"),
    Rule("Docker", "QWEN_EDIT_WEIGHTS=", "parse", "Docker does not run on CI (tests/test_docker.py checks compose)"),
    Rule("Playground", "from openai import OpenAI", "python", "OpenAI's SDK on the test server"),
    Rule(
        "Benchmarks",
        ".venv/bin/qwen-edit bench --url http://127.0.0.1:8000 --key KEY --request-rate",
        "run",
        "the quick open-loop benchmark on the test server, fewer requests (its figure drawn in the core install)",
        quick={"--request-rate 0.5 1 -n 10 --num-warmups 6": "--request-rate 2 inf -n 2 --num-warmups 1"},
        expect="e2el p50 ms",
    ),
    Rule(
        "Benchmarks",
        ".venv/bin/qwen-edit bench --url off=",
        "parse",
        "needs two configured servers, the hosted API's key, minutes (tests/test_bench_client.py runs each kind)",
    ),
    Rule(
        "Benchmarks", ".venv/bin/python -m benchmarks.overhead", "parse", "minutes each (test_benchmarks.py runs them)"
    ),
    Rule("Hardening", "[Unit]", "parse", "a systemd unit: its ExecStart is parsed"),
    Rule(
        "Hardening",
        ".venv/bin/python -m benchmarks.load_test",
        "run",
        "the load test on the test server, 2 s, then it cancels what it left",
        quick={"--seconds 30": "--seconds 2 --submitters 2 --pollers 1"},
        expect="lost=0",
    ),
    Rule("Weights", ".venv/bin/qwen-edit weights download edit-2511", "parse", "58 GB from the Hub"),
    Rule("Memory modes", ".venv/bin/qwen-edit plan", "parse", "imports the real architecture (slow); test_plan.py"),
    Rule(
        "Kubernetes",
        "kubectl create namespace",
        "parse",
        "needs a cluster: test_k8s.py renders and validates docker/k8s",
    ),
    Rule("several GPUs", ".venv/bin/qwen-edit plan", "parse", "the real architecture on meta (slow); test_parallel.py"),
    Rule(
        "vendor-host mode",
        ".venv/bin/pip install -e '.[postgres,caddy]'",
        "parse",
        "binds :443 as root for names only a hosts entry or DNS sends here; test_vendor_host_e2e.py runs it on a free port",
    ),
]


def blocks(path: Path = README) -> list[Block]:
    text = path.read_text()
    prose = FENCE.sub(lambda m: " " * len(m.group(0)), text)  # a "# comment" in a block is no heading
    headings = [(m.start(), m.group(1)) for m in HEADING.finditer(prose)]
    out = []
    for m in FENCE.finditer(text):
        heading = next((h for pos, h in reversed(headings) if pos < m.start()), "")
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines())
        out.append(Block(m.group("lang"), body + "\n", text[: m.start()].count("\n") + 1, heading))
    return out


def rule_for(block: Block) -> Rule:
    found = [r for r in RULES if r.heading in block.heading and block.first.startswith(r.starts)]
    if len(found) != 1:
        what = "no rule" if not found else f"{len(found)} rules"
        raise LookupError(f"{block} has {what} in tests/docblocks.py RULES: add one (run it, or say why not)")
    return found[0]


def substitute(source: str, rule: Rule, url: str, key: str) -> str:
    for old, new in rule.quick.items():
        if old not in source:
            raise LookupError(f"rule {rule.starts!r}: {old!r} is no longer in its block")
        source = source.replace(old, new)
    for old, new in SUBSTITUTE.items():
        source = source.replace(old, new.format(url=url, key=key))
    return source


# --- parse-only: each command line through its own parser ---------------------------------------


def command_lines(source: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments and env assignments dropped."""
    out = []
    for raw in source.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for word in [*shlex.split(raw, comments=True), "&&"]:
            if word not in ("&&", "||", "|", ";"):
                command.append(word)
                continue
            while command and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]) or command[0] == "sudo"):
                command.pop(0)
            if command:
                out.append(command)
            command = []
    return out


def check_command(words: list[str]) -> str | None:
    """Parse one command with its own parser; ``None`` when it is not one of this project's commands.
    Raises (``SystemExit`` from argparse) when the command or an option does not exist."""
    if words[0] in (".venv/bin/qwen-edit", "/srv/qwen-edit/.venv/bin/qwen-edit"):
        args = words[1:]
        if args[:1] == ["bench"]:
            return _module_options("benchmarks.client", args[1:])
        from server.cli import build_parser

        build_parser().parse_args(args)
        return "qwen-edit " + " ".join(args[:2])
    if words[0] == ".venv/bin/python" and words[1:2] == ["-m"] and words[2].startswith(("benchmarks.", "server.")):
        return _module_options(words[2], words[3:])
    return None


def _module_options(module: str, args: list[str]) -> str:
    """Every ``--option`` of ``args`` appears in ``python -m module --help`` (run in this process)."""
    import importlib

    main = importlib.import_module(module).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    help_text = out.getvalue()
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("-") and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text):
            raise SystemExit(f"python -m {module}: no option {option} (its --help does not list it)")
    return module
