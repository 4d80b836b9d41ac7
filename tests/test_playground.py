"""The Playground page, end to end in real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright) against the real server and the tiny model. Screenshots of every state are saved under
$QWEN_EDIT_TEST_ARTIFACTS (default: the test's tmp_path) and the folder is printed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support import API_KEY, ServerProc, png_bytes

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("QWEN_EDIT_TEST_ARTIFACTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {folder}")
    return folder


@pytest.fixture
def page(artifacts: Path) -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def image_loaded(page: Any, selector: str) -> None:
    page.wait_for_function(
        "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
    )


def history(page: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = page.evaluate("JSON.parse(localStorage.getItem('qwenEdit.history') || '[]')")
    return entries


def test_playground_edit_download_chain_and_history(
    server: ServerProc, page: Any, artifacts: Path, tmp_path: Path
) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(png_bytes((320, 256)))

    # The key is asked once and kept.
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    shot(page, artifacts, "01-key-dialog")
    page.fill("#api-key", API_KEY)
    page.click("#save-key")
    assert page.evaluate("localStorage.getItem('qwenEdit.apiKey')") == API_KEY
    assert not page.is_visible("#key-dialog")

    # Upload through the v3 ticket flow; the preview shows the stored copy.
    page.set_input_files("#file", str(source))
    page.wait_for_function("document.getElementById('input-status').textContent.startsWith('Uploaded')")
    image_loaded(page, "#input-preview")
    assert "/files/uploads/" in page.get_attribute("#input-preview", "src")
    shot(page, artifacts, "02-input")

    # Submit with advanced settings; watch the per-step progress arrive.
    page.fill("#prompt", "make the stripes gold")
    page.fill("#width", "512")
    page.fill("#height", "384")
    page.fill("#seed", "11")
    page.select_option("#format", "png")
    page.click("#advanced summary")
    page.fill("#steps", "8")
    page.evaluate(
        """() => { window.seenSteps = [];
        new MutationObserver(() => window.seenSteps.push(document.getElementById('progress-text').textContent))
          .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.click("#submit")
    page.wait_for_function("/step \\d+ \\/ 8/.test(document.getElementById('progress-text').textContent)")
    shot(page, artifacts, "03-progress")

    # The result loads beside the input, with the before/after slider.
    image_loaded(page, "#after")
    page.wait_for_selector("#compare:not([hidden])")
    first = history(page)[0]
    assert first["status"] == "completed" and first["output"].endswith(".png")
    assert page.get_attribute("#after", "src") == first["output"]
    assert page.get_attribute("#before", "src") == first["input"]
    assert any(s.startswith("step ") for s in page.evaluate("window.seenSteps"))
    page.evaluate(
        "() => { const s = document.getElementById('slider'); s.value = 25; s.dispatchEvent(new Event('input')); }"
    )
    assert "25%" in page.get_attribute("#after-wrap", "style")
    shot(page, artifacts, "04-result")

    # Download it.
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    img = Image.open(saved)
    assert img.format == "PNG" and img.size == (512, 384)
    assert saved.name == f"qwen-edit-{first['id']}.png"

    # Chain a second edit on the result.
    page.click("#use-as-input")
    page.wait_for_function("document.getElementById('input-status').textContent.startsWith('Using the last result')")
    chained_input = page.get_attribute("#input-preview", "src")
    assert chained_input == first["output"]  # the output itself is the next input: no re-upload
    image_loaded(page, "#input-preview")
    page.fill("#prompt", "now make it night")
    page.fill("#steps", "2")
    page.click("#submit")
    page.wait_for_function(
        "() => { const h = JSON.parse(localStorage.getItem('qwenEdit.history') || '[]');"
        " return h.length === 2 && ['completed', 'failed'].includes(h[0].status); }"
    )
    second = history(page)[0]
    assert second["status"] == "completed", second
    assert second["id"] != first["id"] and second["input"] == chained_input
    image_loaded(page, "#after")
    assert page.get_attribute("#after", "src") == second["output"]
    assert page.get_attribute("#before", "src") == chained_input
    shot(page, artifacts, "05-chained")
    r = httpx.get(second["output"], timeout=10)
    assert Image.open(io.BytesIO(r.content)).size == (512, 384)  # followed its (512x384) input

    # Reload: the key is not asked again and the history is still there.
    page.reload()
    page.wait_for_selector("#history li >> nth=1")
    assert not page.is_visible("#key-dialog")
    items = page.locator("#history li")
    assert items.count() == 2
    assert items.nth(0).inner_text().startswith("now make it night")
    assert page.locator("#history .badge.completed").count() == 2
    image_loaded(page, "#after")
    shot(page, artifacts, "06-history-after-reload")
    items.nth(1).click()
    page.wait_for_function(f"document.getElementById('after').src === {first['output']!r}")

    # A phone-sized screen: one column, nothing wider than the viewport.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, artifacts, "07-phone")


def test_playground_url_input_and_errors(server: ServerProc, page: Any, artifacts: Path) -> None:
    page.goto(server.url + "/playground")
    page.evaluate(f"localStorage.setItem('qwenEdit.apiKey', {API_KEY!r})")
    page.reload()
    assert not page.is_visible("#key-dialog")

    # Submitting without an image says so, in the page.
    page.fill("#prompt", "x")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "image" in page.inner_text("#error").lower()

    # A pasted URL (here: an upload of ours) works as the input; a bad size is refused with the server's message.
    up = httpx.post(
        server.url + "/api/v3/media/upload/binary",
        headers=server.headers,
        files={"file": ("a.png", png_bytes(), "image/png")},
        timeout=10,
    ).json()["data"]["download_url"]
    page.fill("#image-url", up)
    page.dispatch_event("#image-url", "change")
    image_loaded(page, "#input-preview")
    page.fill("#width", "100")
    page.fill("#height", "100")
    page.click("#submit")
    page.wait_for_function("document.getElementById('error').textContent.includes('size')")
    shot(page, artifacts, "08-error")

    # A wrong key reopens the key dialog.
    page.evaluate("localStorage.setItem('qwenEdit.apiKey', 'wrong')")
    page.fill("#width", "")
    page.fill("#height", "")
    page.click("#submit")
    page.wait_for_selector("#key-dialog[open]")
