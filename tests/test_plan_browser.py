"""A load whose memory plan does not fit is refused on the page, with the plan's sentence.

A real ``moechat serve`` on loopback, told (MOECHAT_HOST_RAM_GB) that this machine has 0.1 GiB
of RAM, and a real headless Chromium pressing Load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import Server, chromium, shot  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = int(os.environ.get("MOECHAT_BROWSER_TIMEOUT_MS", "90000"))
SENTENCE = "This does not fit. host RAM: needs 0.6 GB of 0.1 GB available."


@pytest.fixture(scope="module")
def small_ram_server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECHAT_HOST_RAM_GB", "0.1")
        s = Server(tmp_path_factory.mktemp("plan-browser"), "--no-load").start()
    yield s
    s.stop()


def test_load_that_cannot_fit_shows_the_plan_sentence(small_ram_server):
    with chromium() as browser:
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(TIMEOUT_MS)
        page = ctx.new_page()
        page.goto(small_ram_server.url, wait_until="load")
        page.wait_for_selector("#load")
        page.locator("#backend input").click()
        page.get_by_role("option", name="transformers").first.click()
        box = page.locator("#model-folder input")
        box.fill("synthetic:tiny")
        box.press("Enter")
        page.click("#check-plan")  # the plan, before anything is loaded
        page.locator("#plan-preview").filter(has_text="This does not fit.").first.wait_for()
        preview = page.inner_text("#plan-preview")
        assert "worker process" in preview and "weights" in preview
        page.click("#load")
        page.locator("#load-status").filter(has_text="This does not fit.").first.wait_for()
        shot(page, "plan-refused")
        status = page.inner_text("#load-status")
        assert SENTENCE in status
        assert "Free some host RAM: the worker process alone needs about 0.6 GB" in status
        assert "load anyway with force" in status
        # nothing was loaded: the chat still asks for a model
        assert "synthetic:tiny" not in page.inner_text("#model-status")
        ctx.close()
