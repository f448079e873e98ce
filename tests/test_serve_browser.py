"""The demo page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; never downloads a browser)."""

import os
from pathlib import Path

import pytest
import torch

from brisklm.serve.app import create_app
from brisklm.serve.server import BackgroundServer
from brisklm.streaming.policies import gpe_wait_k
from brisklm.tasks import get_task

def test_page_streams_words_and_shows_latency(tmp_path, chromium):
    executable = chromium
    from playwright.sync_api import sync_playwright
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("translate-gpe")
    source = get_task("translation").examples("test", 1, seed=21)[0].meta["source_words"]
    expected = gpe_wait_k(loaded.model, loaded.tokenizer, [source], 3).outputs[0]
    app = create_app(loaded.model, loaded.tokenizer, options={"k": 3}, model_name="translate-gpe")
    with BackgroundServer(app) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            console_errors = []
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(srv.url + "/", timeout=30_000)
            page.wait_for_function("document.getElementById('server-info').textContent.includes('translate-gpe')",
                                   timeout=30_000)
            page.fill("#source", " ".join(source))
            page.fill("#k", "3")
            page.eval_on_selector("#rate", "el => { el.value = '8'; el.dispatchEvent(new Event('input')); }")
            page.click("#start")
            # while streaming: some source words shown, output words appear before the source is complete
            page.wait_for_selector("#target-stream .word", timeout=30_000)
            partial_src = page.locator("#source-stream .word").count()
            shots = Path(os.environ.get("BRISK_SCREENSHOT_DIR", tmp_path))
            page.screenshot(path=str(shots / "serve_page_streaming.png"), full_page=True)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
            page.wait_for_timeout(700)  # let the 'fresh' highlight fade
            shot = shots / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            words = page.locator("#target-stream .word").all_inner_texts()
            shown = [w.rstrip("0123456789").strip() for w in words]  # each word carries its delay as <sub>
            delays = page.eval_on_selector_all("#target-stream .word sub", "els => els.map(e => Number(e.textContent))")
            assert shown == expected.words and delays == expected.delays
            assert partial_src < len(source), "the first output word should appear before the whole source was sent"
            assert page.locator("#source-stream .word").count() == len(source)
            assert page.locator("#source-stream .word.read").count() == len(source)
            al = page.text_content("#f-al")
            assert al not in ("–", "") and float(al) > 0
            assert page.text_content("#f-lat") != "–"
            # an unknown word shows a clear error instead of breaking the page
            page.fill("#source", "zzzunknown words")
            page.click("#start")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            assert "unknown_word" in page.text_content("#status")
            assert not console_errors, console_errors
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
