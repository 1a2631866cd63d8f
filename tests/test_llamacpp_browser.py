"""The llama.cpp plugin in a real headless Chromium against a real ``moechat serve``: pick the GGUF
from the model picker, load it from the backend dropdown, chat, Stop while it reads a long prompt,
switch to another backend and back.

Stop is pressed while llama.cpp evaluates the prompt, not while the reply streams: a tiny model
streams hundreds of tokens a second, and the page, which redraws the chat for every token, then
answers the Stop click only seconds later on a loaded two-core machine (Stop mid-reply is covered
through the real worker by the contract suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import Server, chromium, shot  # noqa: E402
from llamacpp_models import tiny_gguf  # noqa: E402
from test_browser import (  # noqa: E402
    TIMEOUT_MS, bubbles, choose, fill, load, open_page, open_section, send, wait_reply, wait_text,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LABEL = "llama.cpp: GGUF files (Q4_K_M and friends)"
FILE = "tiny-llama-q8_0.gguf"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    tiny_gguf(models, hidden_size=512, intermediate_size=2048, num_hidden_layers=6)  # writes slowly enough to Stop
    server = Server(tmp_path_factory.mktemp("home"), "--no-load", "--models-dir", str(models)).start()
    try:
        with chromium() as browser:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            ctx.set_default_timeout(TIMEOUT_MS)
            p = ctx.new_page()
            open_page(p, server.url)
            yield p
            ctx.close()
    finally:
        server.stop()


def load_gguf(page) -> None:
    choose(page, "backend", LABEL)
    choose(page, "model-folder", FILE)
    # one thread: llama.cpp's threads spin on every core, and the server on this small test machine
    # needs one to hear the Stop
    page.locator('[id="setting-llama.cpp-threads"] input').fill("1")
    page.locator('[id="setting-llama.cpp-batch_size"] input').fill("4")
    page.click("#load")
    wait_text(page, "#model-status", f"Loaded {FILE} with llama.cpp")


def test_load_a_gguf_chat_stop_switch_and_back(page):
    load_gguf(page)
    open_section(page, "sampling", "System prompt and sampling")
    fill(page, "sampling-max_new_tokens", "8")
    send(page, "Hello there")
    reply = wait_reply(page, lambda t: f"llama.cpp · {FILE}" in t)
    assert "reply tokens" in reply and "tok/s" in reply
    wait_text(page, "#stats", "llama decode tok s")                       # what llama.cpp measured
    shot(page, "llamacpp-01-loaded-and-replied")

    # Stop while llama.cpp reads a long prompt (a few batches of batch_size tokens a second here):
    # it stops between two batches, before the reply starts
    send(page, "sea " * 3500)
    wait_text(page, "#notice", "Waiting for the model")
    page.click("#stop")
    wait_text(page, "#notice", "Stopped before the reply started")
    assert len(bubbles(page, "bot")) == 1
    shot(page, "llamacpp-02-stopped")

    page.click("#new-chat")
    load(page, "Fake")
    wait_text(page, "#model-status", "Loaded fake-echo with fake")
    send(page, "now the fake one")
    wait_reply(page, lambda t: t.startswith("now the fake one") and "fake · fake-echo" in t)

    fill(page, "sampling-max_new_tokens", "6")
    load_gguf(page)
    send(page, "and llama.cpp again")
    wait_reply(page, lambda t: f"llama.cpp · {FILE}" in t and "✂" not in t)
    assert bubbles(page, "user") == ["now the fake one", "and llama.cpp again"]
    shot(page, "llamacpp-03-switched-and-back")
