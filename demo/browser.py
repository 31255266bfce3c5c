"""Drive the demo page in Debian's headless Chromium: upload an image, read the student's class, take a screenshot.

Used by ``tests/test_demo_browser.py`` and to refresh the README's screenshot from a real run of the page:

    python -m edgedistill.demo.browser RUN_DIR_OR_BUNDLE IMAGE docs/demo.png

Needs ``pip install playwright`` and a system Chromium (``apt-get install chromium``); it never downloads a browser.
"""
import argparse
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Headless, offline and quiet: no sandbox (CI containers run as root), no GPU, no calls to Google's services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 860}


def open_browser(playwright, profile: Path):
    """A fresh Chromium profile in ``profile`` (Playwright takes the user-data-dir here, not in the args)."""
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                         headless=True, viewport=VIEWPORT)


def classify_in_browser(url: str, image, screenshot=None, timeout_s: float = 60) -> dict:
    """Load the page, upload ``image``, wait for the answer; returns the student's class and the summary text."""
    from playwright.sync_api import sync_playwright

    from .app import PLACEHOLDER

    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="edgedistill-chromium-") as profile:
        browser = open_browser(p, Path(profile))
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_s * 1e3)
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(image))
            # The summary changes from its placeholder once the request is answered (result or message).
            wait_for_answer(page, PLACEHOLDER)
            if screenshot:  # the first request also loaded the models: show a warm one
                before = page.locator("#summary").inner_text()
                page.locator("#classify").click()
                wait_for_answer(page, before)
            top = page.locator("#student [data-testid=label-output-value]")
            result = {"student": top.inner_text().strip() if top.count() else "",
                      "summary": page.locator("#summary").inner_text()}
            if screenshot:
                page.screenshot(path=str(screenshot), full_page=True)
            return result
        finally:
            browser.close()


def wait_for_answer(page, previous: str):
    """Until the summary shows a new answer (a result or a message) and the outputs have settled."""
    page.wait_for_function("prev => { const s = document.querySelector('#summary');"
                           " return s && s.innerText !== prev && /Student|Not classified/.test(s.innerText); }",
                           arg=previous)
    page.locator("#student [data-testid=status-tracker].hide").wait_for(state="attached")
    page.wait_for_timeout(500)  # the outputs fade in


def main(argv=None) -> int:
    from .app import launch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="run folder or bundle folder")
    p.add_argument("image", help="image to upload")
    p.add_argument("screenshot", help="PNG to write")
    p.add_argument("--port", type=int, default=7861)
    args = p.parse_args(argv)
    demo = launch(args.path, port=args.port, block=False)
    try:
        result = classify_in_browser(f"http://127.0.0.1:{args.port}/", args.image, args.screenshot)
    finally:
        demo.close()
    print(f"student: {result['student']}\n{result['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
