"""The reference tables of ``docs/API.md``, generated from the app's own OpenAPI schema.

``docs/API.md`` is prose in the project's words with generated tables between markers::

    <!-- generated: endpoints -->
    ...
    <!-- end generated: endpoints -->

so the endpoints and the fields a client may send can never drift from what the server accepts.

    python -m server.api.reference --write    # rewrite the tables in docs/API.md
    python -m server.api.reference --check    # exit 1 when they are stale (tests/test_docs.py runs it)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "API.md"
MARKER = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)", re.S)
# Request and response bodies documented field by field (the OpenAPI component names).
MODELS = ("EditRequest", "LoraSpec", "Prediction", "UploadRequest", "ErrorEnvelope")


def openapi() -> dict[str, Any]:
    """The schema of an app built with default settings (nothing is started: no lifespan runs)."""
    from server.api.app import create_app
    from server.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(Settings(data_dir=Path(tmp))).openapi()


def endpoints_table(schema: dict[str, Any]) -> str:
    lines = ["| method | path | what |", "|---|---|---|"]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            lines.append(f"| `{method.upper()}` | `{path}` | {_cell(op.get('summary', ''))} |")
    return "\n".join(lines)


def model_table(schema: dict[str, Any], name: str) -> str:
    model = schema["components"]["schemas"][name]
    required = set(model.get("required", []))
    lines = ["| field | type | default | rules | what |", "|---|---|---|---|---|"]
    for field, spec in model["properties"].items():
        default = "required" if field in required else _default(spec)
        what = _cell(spec.get("description", ""))
        lines.append(f"| `{field}` | {_type(spec)} | {default} | {_rules(spec)} | {what} |")
    return "\n".join(lines)


def _type(spec: dict[str, Any]) -> str:
    options = [s for s in spec.get("anyOf", [spec]) if s.get("type") != "null"]
    nullable = len(options) < len(spec.get("anyOf", [spec]))
    words = []
    for option in options:
        if "$ref" in option:
            words.append(option["$ref"].rsplit("/", 1)[-1])
        elif "enum" in option:
            words.append(" \\| ".join(f"`{v}`" for v in option["enum"]))
        elif option.get("type") == "array":
            words.append(f"array of {_type(option.get('items', {}))}")
        elif "const" in option:
            words.append(f"`{option['const']}`")
        else:
            words.append(str(option.get("type", "any")))
    text = " or ".join(words) or "any"
    return f"{text} or null" if nullable else text


def _default(spec: dict[str, Any]) -> str:
    if "default" not in spec:
        return "(none)"
    value = spec["default"]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _rules(spec: dict[str, Any]) -> str:
    rules: list[str] = []
    for option in [spec, *spec.get("anyOf", [])]:
        bounds = [
            ("minLength", "at least {} character(s)"),
            ("maxLength", "at most {} characters"),
            ("minimum", "≥ {}"),
            ("maximum", "≤ {}"),
            ("minItems", "at least {} items"),
            ("maxItems", "at most {} items"),
        ]
        for key, text in bounds:
            if key in option:
                value = option[key]
                rules.append(text.format(int(value) if float(value).is_integer() else value))
    return ", ".join(dict.fromkeys(rules))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def sections(schema: dict[str, Any]) -> dict[str, Callable[[], str]]:
    out: dict[str, Callable[[], str]] = {"endpoints": lambda: endpoints_table(schema)}
    for name in MODELS:
        out[name] = lambda name=name: model_table(schema, name)  # type: ignore[misc]
    return out


def render(text: str, schema: dict[str, Any]) -> str:
    """``text`` with every generated section rewritten; an unknown section name is an error."""
    makers = sections(schema)

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in makers:
            raise KeyError(f"docs/API.md names an unknown generated section {name!r} (known: {', '.join(makers)})")
        return f"{match.group(1)}{makers[name]()}\n{match.group(4)}"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.api.reference", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated tables of docs/API.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if they differ from the schema")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    fresh = render(text, openapi())
    if args.write:
        args.doc.write_text(fresh)
        return 0
    if fresh != text:
        print(
            f"{args.doc}: the generated tables differ from the app's OpenAPI schema; "
            "run `.venv/bin/python -m server.api.reference --write`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
