"""A plugin that fails to load is shown on the page with its error; the others still work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import Server, chromium, shot  # noqa: E402
from test_plugins import install_fake_distribution  # noqa: E402

pytestmark = [pytest.mark.browser]


def test_a_broken_plugin_is_reported_on_the_page(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "exploding_plugin", "raise RuntimeError('boom at import')\n", "exploding")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        (tmp_path / "home").mkdir()
        server = Server(tmp_path / "home", "--no-load").start()
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(server.url, wait_until="load")
            page.wait_for_selector("#broken-plugins")
            text = page.inner_text("#broken-plugins")
            assert "exploding" in text and "boom at import" in text
            page.locator("#backend input").click()  # the working backends are still offered
            page.get_by_role("option", name="Fake: echoes your message (for tests)").first.wait_for()
            shot(page, "broken-plugin")
    finally:
        server.stop()
