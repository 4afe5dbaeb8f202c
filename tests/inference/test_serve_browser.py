"""The page served at ``/``, driven in a real headless browser (Debian's chromium through Playwright):
the model's name shows, a typed prompt streams text back, tokens/s updates, Stop frees the stream."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.models.registry import ModelSize, build_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

from attnfree.inference.serve.app import create_app, serve_in_thread  # noqa: E402

CHROMIUM = os.environ.get("ATTNFREE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.environ.get("ATTNFREE_PAGE_SCREENSHOT")  # also save the screenshot here (docs)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (apt install chromium, "
                                "or set ATTNFREE_CHROMIUM)")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = build_model("fastformer", ModelSize(32, 2, 2, n_positions=4096), tok).eval()
    with serve_in_thread(create_app(model, tok, "tiny-fastformer", max_streams=4, max_tokens=4000)) as base:
        yield base


@pytest.fixture(scope="module")
def page(url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_page_streams_generated_text(url: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 1. the page loads and shows the model's name and size
    page.goto(url)
    sync_api.expect(page.locator("#model")).to_contain_text("tiny-fastformer", timeout=10_000)
    sync_api.expect(page.locator("#model")).to_contain_text("parameters")
    # 2. type a prompt, choose settings, press Generate
    page.fill("#prompt", "Once upon a time")
    page.fill("#max_tokens", "300")
    page.fill("#temperature", "0.9")
    page.click("#generate")
    # 3. streamed text arrives and the tokens/s figure appears while it streams (the first token waits for a core
    #    on a machine shared with the other test workers, hence the minute)
    page.wait_for_function("document.getElementById('generated').textContent.length > 0", timeout=60_000)
    page.wait_for_function("/[0-9.]+ tokens\\/s/.test(document.getElementById('status').textContent)",
                           timeout=10_000)
    sync_api.expect(page.locator("#output .prompt")).to_have_text("Once upon a time")
    # 4. it ends with the stream's stats (300 tokens, or fewer if the random model sampled EOS)
    sync_api.expect(page.locator("#status")).to_contain_text("finish: ", timeout=60_000)
    assert float(page.locator("#status").get_attribute("data-rate") or 0) > 0
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_stop_button_frees_the_stream(url: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(url)
    page.fill("#prompt", "a long one")
    page.fill("#max_tokens", "4000")
    page.check("#greedy")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generated').textContent.length > 0", timeout=60_000)
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_contain_text("stopped after", timeout=10_000)
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/stats").json()["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = httpx.get(f"{url}/stats").json()
    assert stats["active_streams"] == 0 and stats["cancelled"] >= 1
