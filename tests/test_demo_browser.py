"""The demo page in a real browser: Debian's Chromium, driven by Playwright, loads the page, gets an image uploaded,
shows the student's class, and a screenshot is taken. Runs in CI (``.ci/run`` installs chromium through apt)."""
from pathlib import Path

import pytest
from edgedistill.demo.browser import CHROMIUM

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).is_file():
    pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium chromium-driver",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright "
                    "(the system Chromium is used; never `playwright install`)")
pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'edgedistill[demo]'")

from test_demo import demo_run, free_port, held_out_images  # noqa: E402


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from edgedistill.demo.app import launch

    run = demo_run(tmp_path_factory.getbasetemp(), "demo-closed")
    port = free_port()
    demo = launch(run, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", run
    demo.close()


def test_page_classifies_an_uploaded_image(page_url, tmp_path):
    from edgedistill.demo.browser import classify_in_browser

    url, run = page_url
    shot = tmp_path / "demo.png"
    result = classify_in_browser(url, held_out_images(run)["blue"], screenshot=shot)
    assert result["student"] == "blue", result["summary"]
    assert "Teacher" in result["summary"] and "ms" in result["summary"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_page_shows_a_message_for_a_file_that_is_not_an_image(page_url, tmp_path):
    from edgedistill.demo.browser import classify_in_browser

    url, _ = page_url
    text = tmp_path / "notes.png"  # named like an image, so only its content gives it away
    text.write_text("not an image\n" * 10)
    result = classify_in_browser(url, text)
    assert "Not classified" in result["summary"] and "not an image" in result["summary"]
    assert result["student"] == ""
