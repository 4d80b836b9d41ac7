"""The docs stay true: docs/API.md's generated tables match the app's OpenAPI schema, and every
relative link in the README and docs/ leads to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from server.api.reference import DOC, MARKER, main, openapi, render

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_api_reference_matches_the_schema() -> None:
    text = DOC.read_text()
    assert {m.group("name") for m in MARKER.finditer(text)} >= {"endpoints", "EditRequest", "Prediction"}
    fresh = render(text, openapi())
    assert fresh == text, "docs/API.md is stale: run `.venv/bin/python -m server.api.reference --write`"


def test_check_mode_fails_on_a_stale_table(tmp_path: Path, capsys: object) -> None:
    stale = tmp_path / "API.md"
    stale.write_text("<!-- generated: endpoints -->\n| old |\n<!-- end generated: endpoints -->\n")
    assert main(["--check", "--doc", str(stale)]) == 1
    assert main(["--write", "--doc", str(stale)]) == 0
    assert "/api/v3/predictions/{prediction_id}/result" in stale.read_text()
    assert main(["--check", "--doc", str(stale)]) == 0


def test_links_stay_inside_the_repository() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "shared/" not in text, f"{doc.name} points outside the repository"
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s) and mailto links
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{doc.name}: {target} is outside the repository"
            assert path.exists(), f"{doc.name}: {target} does not exist"
