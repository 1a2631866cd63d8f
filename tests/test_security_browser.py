"""Safe on a LAN, in a real headless Chromium: the page of a server locked with an API key and
logins, a remote backend's key typed by the admin that never reaches another person's page, the
operator's allow-list, and Enter / Shift+Enter in the message box."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import Server, chromium, free_port, shot  # noqa: E402
from browser_helpers import log_in as browser_log_in  # noqa: E402
from test_browser import TIMEOUT_MS, bubbles, choose, fill, wait_reply, wait_text  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

KEY = "sk-page-key"
SECRET = "sk-upstream-secret-7d1f"
USERS = {"alice": "wonderland", "bob": "builder"}
REMOTE = "Remote: an OpenAI-compatible server (vLLM, llama.cpp, another moechat)"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The bigger server the remote backend talks to; it needs SECRET."""
    s = Server(tmp_path_factory.mktemp("upstream"), "--backend", "fake", "--api-key", SECRET).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lan(tmp_path_factory, upstream):
    """The LAN server: a key, two logins, alice the admin, the upstream the only allowed remote."""
    data = tmp_path_factory.mktemp("lan")
    (data / "users.txt").write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECHAT_REMOTE_ALLOWED_URLS", upstream.url + "v1")
    mp.delenv("MOECHAT_REMOTE_URL", raising=False)
    mp.delenv("MOECHAT_REMOTE_API_KEY", raising=False)
    s = Server(data, "--backend", "fake", "--set", "delay_s=0.05", "--api-key", KEY,
               "--auth", str(data / "users.txt"), "--admin", "alice").start()
    yield s
    s.stop()
    mp.undo()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def log_in(browser, server: Server, user: str, password: str):
    ctx, page = browser_log_in(browser, server.url, user, password, TIMEOUT_MS)
    wait_text(page, "#history-note", f"Signed in as {user}")
    return ctx, page


def test_the_page_asks_for_a_login_and_takes_the_api_key(browser, lan):
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.goto(lan.url, wait_until="load")
        page.get_by_label("password").wait_for(timeout=TIMEOUT_MS)
        assert page.locator("#chatbot").count() == 0
        assert "API key" in page.inner_text("body")
        page.get_by_label("username").fill("carol")
        page.get_by_label("password").fill("not-the-key")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect credentials").wait_for(timeout=TIMEOUT_MS)
        assert page.locator("#chatbot").count() == 0
    finally:
        ctx.close()
    ctx, page = log_in(browser, lan, "carol", KEY)
    try:
        wait_text(page, "#model-status", "Loaded fake-echo with fake")
        assert page.locator("#load").is_disabled()          # not an admin
        shot(page, "20-key-login")
    finally:
        ctx.close()


def test_enter_sends_and_shift_enter_adds_a_line(browser, lan):
    ctx, page = log_in(browser, lan, "carol", KEY)
    try:
        wait_text(page, "#model-status", "Loaded fake-echo with fake")
        box = page.locator("#message textarea")
        box.click()
        box.type("first line")
        box.press("Shift+Enter")
        box.type("second line")
        assert box.input_value() == "first line\nsecond line" and not bubbles(page, "user")
        box.press("Enter")
        wait_reply(page, lambda t: "second line" in t and "fake-echo" in t)
        assert bubbles(page, "user")[-1].splitlines()[:2] == ["first line", "second line"]
        assert box.input_value() == ""
    finally:
        ctx.close()


def test_a_remote_key_typed_by_the_admin_never_reaches_another_page(browser, lan, upstream):
    alice_ctx, alice = log_in(browser, lan, "alice", USERS["alice"])
    bob_ctx = None
    try:
        choose(alice, "backend", REMOTE)
        # operator-only settings are not in the form: no program, no allow-list
        assert alice.locator("#setting-remote-allowed_urls").count() == 0
        assert alice.locator("#setting-fake-python").count() == 0
        # a server the operator did not allow is refused before anything is sent there
        other = f"http://127.0.0.1:{free_port()}/v1"
        fill(alice, "setting-remote-base_url", other)
        fill(alice, "setting-remote-api_key", SECRET)
        alice.click("#load")
        wait_text(alice, "#load-status", "is not one the operator allowed")
        wait_text(alice, "#model-status", "Loaded fake-echo with fake")   # the loaded model stayed
        fill(alice, "setting-remote-base_url", upstream.url + "v1")
        alice.click("#load")
        wait_text(alice, "#model-status", "with remote")
        shot(alice, "21-remote-loaded")

        bob_ctx, bob = log_in(browser, lan, "bob", USERS["bob"])
        wait_text(bob, "#model-status", "with remote")
        key_box = bob.locator("#setting-remote-api_key input")
        key_box.wait_for(state="attached")
        assert key_box.input_value() == "" and "set" in key_box.get_attribute("placeholder")
        assert bob.locator("#setting-remote-base_url input").input_value() == upstream.url + "v1"
        values = bob.evaluate("() => [...document.querySelectorAll('input, textarea')].map(e => e.value).join('|')")
        config = bob.request.get(lan.url + "config").text()
        for seen in (values, bob.content(), config):
            assert SECRET not in seen
        alice.reload(wait_until="load")
        alice.wait_for_selector("#chatbot")
        wait_text(alice, "#model-status", "with remote")
        assert alice.locator("#setting-remote-api_key input").input_value() == ""
        assert SECRET not in alice.content()
        assert SECRET not in (lan.data_dir / f"server-{lan.port}.log").read_text(errors="replace")
    finally:
        alice_ctx.close()
        if bob_ctx is not None:
            bob_ctx.close()
