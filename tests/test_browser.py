"""The web chat in a real headless Chromium against a real ``moechat serve`` on loopback.

Every test checks what a person sees on the page. Screenshots of the main states go to
test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import re
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import Server, chromium, log_in, shot  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = int(os.environ.get("MOECHAT_BROWSER_TIMEOUT_MS", "90000"))
LONG = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty twentyone twentytwo twentythree finalword")


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model(contract_model_dir) -> Path:
    """The demo model, prebuilt once per session (tests/conftest.py); copied into each data dir
    as ``demo-model``, where the app would otherwise build it on first use."""
    return contract_model_dir


def data_dir_with_demo(tmp_path_factory, demo_model: Path, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    shutil.copytree(demo_model, d / "demo-model")
    return d


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def main_server(tmp_path_factory, demo_model):
    s = Server(data_dir_with_demo(tmp_path_factory, demo_model, "main"), "--no-load").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(browser, main_server):
    """One page of the main server, shared by the tests that build on each other's state."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    p = ctx.new_page()
    open_page(p, main_server.url)
    yield p
    ctx.close()


# ---- what a person does -------------------------------------------------------------------
def open_page(page, url: str) -> None:
    page.goto(url, wait_until="load")
    page.wait_for_selector("#chatbot")
    page.wait_for_selector("#chat-list")


def fresh_page(browser, url: str):
    """A new browser context with the page at ``url`` open: (context, page)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    open_page(page, url)
    return ctx, page


def choose(page, elem_id: str, option_text: str) -> None:
    """Pick an option of a Gradio dropdown by the text it shows."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option_text).first.click()


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.blur()


def load(page, backend_label: str, folder: str | None = None, choices: dict[str, str] | None = None,
         **settings: str) -> None:
    """Choose the backend, the model folder and settings in the form, and press Load."""
    choose(page, "backend", backend_label)
    backend = backend_label.split(":")[0].strip().lower()
    if folder is not None:
        box = page.locator("#model-folder input")
        box.fill(folder)
        box.press("Enter")
    for key, value in (choices or {}).items():
        choose(page, f"setting-{backend}-{key}", value)
    for key, value in settings.items():
        fill(page, f"setting-{backend}-{key}", value)
    page.click("#load")


def open_section(page, elem_id: str, title: str) -> None:
    """Open a closed accordion (its content is not on the page until it is open)."""
    if page.locator(f"#{elem_id} input, #{elem_id} textarea").count() == 0:
        page.locator(f"#{elem_id}").get_by_text(title).first.click()
        page.locator(f"#{elem_id} input, #{elem_id} textarea").first.wait_for()


def wait_text(page, selector: str, text: str, timeout: int = TIMEOUT_MS) -> None:
    page.locator(selector).filter(has_text=text).first.wait_for(timeout=timeout)


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.click("#send")


def bubbles(page, role: str) -> list[str]:
    """The text of the chat's messages of ``role`` (user or bot), in order."""
    return page.locator(f"#chatbot .message-row.{role}-row").all_inner_texts()


def last_reply(page) -> str:
    replies = bubbles(page, "bot")
    return replies[-1] if replies else ""


def wait_reply(page, predicate, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = last_reply(page)
        if predicate(text):
            return text
        page.wait_for_timeout(100)
    raise AssertionError(f"the reply never became what was expected; it reads: {last_reply(page)!r}")


# ---- the tests ----------------------------------------------------------------------------
def test_load_the_demo_model_from_the_dropdown_and_form_and_chat(page):
    assert "Nothing is loaded" in page.inner_text("#model-status")
    send(page, "Hello before loading")
    wait_text(page, "#notice", "No model is loaded")
    assert page.locator("#message textarea").input_value() == "Hello before loading"   # kept to send later

    load(page, "transformers", folder="", choices={"device": "cpu"})
    wait_text(page, "#model-status", "Loaded demo-model with transformers")
    wait_text(page, "#load-status", "Loaded demo-model with transformers")
    open_section(page, "sampling", "System prompt and sampling")
    fill(page, "sampling-max_new_tokens", "8")
    send(page, "Hello there")
    reply = wait_reply(page, lambda t: "transformers · demo-model" in t)
    assert "reply tokens" in reply and "tok/s" in reply
    assert bubbles(page, "user") == ["Hello there"]
    assert page.locator("#message textarea").input_value() == ""
    wait_text(page, "#stats", "tok/s")
    shot(page, "01-demo-model-loaded-and-replied")


def test_stream_stop_regenerate_continue_and_edit(page):
    page.click("#new-chat")
    open_section(page, "sampling", "System prompt and sampling")
    fill(page, "sampling-max_new_tokens", "64")
    load(page, "Fake", delay_s="0.25")
    wait_text(page, "#model-status", "Loaded fake-echo with fake")

    send(page, LONG)
    partial = wait_reply(page, lambda t: "one two" in t)                 # it streams ...
    assert "finalword" not in partial                                      # ... word by word
    wait_text(page, "#stats", "tokens written")                          # live stats while it streams
    assert "tok/s (this reply)" in page.inner_text("#stats")
    shot(page, "02-streaming")
    page.click("#stop")
    stopped = wait_reply(page, lambda t: "✂ stopped" in t)
    assert "finalword" not in stopped
    wait_text(page, "#notice", "Stopped")
    shot(page, "03-stopped")

    page.click("#regenerate")
    again = wait_reply(page, lambda t: "fake · fake-echo" in t and "✂" not in t, timeout_s=60)
    assert again.startswith(LONG)
    assert len(bubbles(page, "bot")) == 1 and bubbles(page, "user") == [LONG]

    page.locator("#chat-list").get_by_text(LONG[:20]).wait_for()        # the chat is in the history
    open_section(page, "edit-tools", "Edit or delete a message")
    page.locator("#chatbot .message-row.user-row").first.click()        # choose the message to edit
    page.wait_for_function("document.querySelector('#edit-box textarea').value.length > 0")
    assert page.locator("#message-number input").input_value() == "1"
    page.locator("#edit-box textarea").fill("an edited question")
    page.click("#save-edit")
    edited = wait_reply(page, lambda t: t.startswith("an edited question") and "fake-echo" in t)
    assert "one two" not in edited
    assert bubbles(page, "user") == ["an edited question"]
    shot(page, "04-edited-and-regenerated")


def test_switch_backend_and_back_keeps_the_chat(page):
    before_users = bubbles(page, "user")
    assert before_users == ["an edited question"]
    load(page, "transformers", choices={"device": "cpu"})
    wait_text(page, "#model-status", "Loaded demo-model with transformers")
    assert bubbles(page, "user") == before_users
    send(page, "now the demo model")
    wait_reply(page, lambda t: "transformers · demo-model" in t)
    load(page, "Fake")
    wait_text(page, "#model-status", "Loaded fake-echo with fake")
    assert bubbles(page, "user") == ["an edited question", "now the demo model"]
    send(page, "back to fake")
    wait_reply(page, lambda t: t.startswith("back to fake") and "fake · fake-echo" in t)
    replies = bubbles(page, "bot")
    assert "fake · fake-echo" in replies[0] and "transformers · demo-model" in replies[1]
    shot(page, "05-switched-backends-chat-kept")

    send(page, "Code:\n```python\ndef add(a, b):\n    return a + b\n```")    # echoed back as Markdown
    wait_reply(page, lambda t: "def add" in t and "fake-echo" in t)
    code = page.locator("#chatbot .message-row.bot-row pre code").last
    assert "return a + b" in code.inner_text()
    assert code.locator("span.token.keyword").count() >= 1                  # highlighted, not plain text
    shot(page, "05b-markdown-code")


def test_a_failed_load_says_why_on_the_page_and_keeps_the_model_and_chat(page):
    users = bubbles(page, "user")
    load(page, "transformers", folder="/nonexistent/model-folder")
    wait_text(page, "#load-status", "Load failed")
    status = page.inner_text("#load-status")
    assert "only from the models folders" in status      # outside them, whether it exists or not
    assert "Loaded fake-echo with fake" in page.inner_text("#model-status")   # the loaded model stayed
    assert bubbles(page, "user") == users
    shot(page, "06-failed-load")


def test_the_chats_own_edit_icon_continue_and_delete_a_message(page):
    users_before = bubbles(page, "user")
    page.locator("#chatbot .message-row.user-row").last.hover()
    page.locator("#chatbot button[aria-label=Edit]").last.click()
    page.locator("#chatbot textarea").fill("native edit words")
    page.locator("#chatbot button[aria-label=Submit]").click()
    wait_reply(page, lambda t: t.startswith("native edit words") and "fake-echo" in t)
    assert bubbles(page, "user") == users_before[:-1] + ["native edit words"]

    fill(page, "sampling-max_new_tokens", "2")
    page.click("#regenerate")
    wait_reply(page, lambda t: t.startswith("native edit\n") and "reached the token limit" in t)
    page.click("#continue")
    wait_reply(page, lambda t: t.startswith("native editnative edit\n"))
    fill(page, "sampling-max_new_tokens", "64")

    replies = len(bubbles(page, "bot"))
    page.locator("#chatbot .message-row.bot-row").last.click()         # choose the last reply
    page.wait_for_function(f"document.querySelector('#message-number input').value === '{2 * replies}'")
    page.click("#delete-message")
    wait_text(page, "#notice", f"Deleted message {2 * replies}.")
    assert len(bubbles(page, "bot")) == replies - 1
    assert bubbles(page, "user") == users_before[:-1] + ["native edit words"]


def test_history_rename_search_export_import_and_delete(page, tmp_path):
    open_section(page, "chat-tools", "This chat")
    page.locator("#rename-box input, #rename-box textarea").first.fill("Switching backends")
    page.click("#rename")
    wait_text(page, "#chat-list", "Switching backends")
    titles = lambda: page.locator("#chat-list label").all_inner_texts()   # noqa: E731
    count = len(titles())
    assert count >= 2

    search = page.locator("#search input, #search textarea").first
    search.fill("switching")
    page.wait_for_function("document.querySelectorAll('#chat-list label').length === 1")
    assert "Switching backends" in titles()[0]
    search.fill("edited question")                 # text inside a message, not the title
    page.wait_for_function("document.querySelectorAll('#chat-list label').length === 1")
    assert "Switching backends" in titles()[0]
    search.fill("")
    page.wait_for_function(f"document.querySelectorAll('#chat-list label').length === {count}")

    page.click("#export-json")
    link = page.locator("#export-file a").first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    exported = tmp_path / "chat.json"
    dl.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["title"] == "Switching backends"
    assert [m["content"] for m in data["messages"] if m["role"] == "user"][:2] == [
        "an edited question", "now the demo model"]

    with page.expect_file_chooser() as fc:
        page.click("#import")
    fc.value.set_files(str(exported))
    wait_text(page, "#history-note", "Imported.")
    assert len(titles()) == count + 1
    assert bubbles(page, "user")[:2] == ["an edited question", "now the demo model"]

    page.click("#delete-chat")
    wait_text(page, "#history-note", "Chat deleted.")
    assert len(titles()) == count and bubbles(page, "user") == []
    shot(page, "06b-history")


def test_loading_shows_its_stage_and_progress_and_can_be_cancelled(page):
    load(page, "Fake", delay_s="3600")   # pretend steps of an hour: this load ends only by Cancel
    wait_text(page, "#load-status", "Pretending to load")
    assert "of 3 steps" in page.inner_text("#load-status")
    shot(page, "06c-loading")
    page.click("#cancel-load")
    wait_text(page, "#load-status", "Loading was cancelled; nothing is loaded.")
    wait_text(page, "#model-status", "Nothing is loaded.")
    send(page, "anyone there?")
    wait_text(page, "#notice", "No model is loaded.")


def test_a_reply_cut_by_a_server_crash_is_kept_and_marked_after_restart(browser, tmp_path_factory, demo_model):
    data = data_dir_with_demo(tmp_path_factory, demo_model, "restart")
    first = Server(data, "--backend", "fake", "--set", "delay_s=0.3").start()
    try:
        ctx, page = fresh_page(browser, first.url)
        wait_text(page, "#model-status", "Loaded fake-echo with fake")
        send(page, LONG)
        wait_reply(page, lambda t: "one two three" in t)
        first.kill()                                   # SIGKILL mid-reply
    finally:
        first.stop()
    page.close()      # the old page's scripts may reload it when the port answers again, aborting a goto
    second = Server(data, "--no-load", port=first.port).start()
    try:
        page = ctx.new_page()
        open_page(page, second.url)
        page.locator("#chat-list").get_by_text(LONG[:20]).click()
        reply = wait_reply(page, lambda t: "✂" in t)
        assert "one two three" in reply and "finalword" not in reply
        assert "cut off: the server stopped" in reply
        shot(page, "07-cut-reply-after-restart")
    finally:
        ctx.close()
        second.stop()


def test_two_users_see_only_their_own_chats_and_the_second_waits_in_the_queue(browser, tmp_path_factory, demo_model):
    data = data_dir_with_demo(tmp_path_factory, demo_model, "users")
    users = data / "users.txt"
    users.write_text("alice:wonderland\nbob:builder\n")
    hold = data / "hold-replies"      # while it exists, a reply stops after its first word (the fake backend)
    srv = Server(data, "--backend", "fake", "--set", "delay_s=0.05", "--set", f"hold_file={hold}",
                 "--auth", str(users), "--admin", "alice").start()
    contexts = []
    try:
        pages = {}
        for name, password in (("alice", "wonderland"), ("bob", "builder")):
            c, p = log_in(browser, srv.url, name, password, TIMEOUT_MS)
            contexts.append(c)
            wait_text(p, "#history-note", f"Signed in as {name}")
            pages[name] = p
        alice, bob = pages["alice"], pages["bob"]
        wait_text(alice, "#model-status", "Loaded fake-echo with fake")
        assert bob.locator("#load").is_disabled() and not alice.locator("#load").is_disabled()
        for p in (alice, bob):                         # a comparison loads models: the same permission
            p.locator("#compare").get_by_text("Compare backends on one prompt").first.click()
            p.locator("#compare-run").wait_for()
        assert bob.locator("#compare-run").is_disabled() and not alice.locator("#compare-run").is_disabled()

        hold.touch()                                   # alice's reply runs until bob is done queueing
        send(alice, "alice private words " + LONG)
        wait_reply(alice, lambda t: t.startswith("alice"))
        send(bob, "bob asks something")
        wait_text(bob, "#notice", "Queued: 1 request ahead of yours")
        shot(bob, "08-bob-queued")
        bob.click("#stop")                             # bob gives up; alice's reply goes on
        wait_text(bob, "#notice", "Stopped before the reply started")
        send(bob, "bob asks again")                    # at once: a send right after a turn ends is taken
        wait_text(bob, "#notice", "Queued: 1 request ahead of yours")
        assert "✂" not in last_reply(alice)
        hold.unlink()
        done = wait_reply(alice, lambda t: "fake · fake-echo" in t)
        assert "✂" not in done and "finalword" in done
        wait_reply(bob, lambda t: t.startswith("bob asks again") and "fake-echo" in t)
        shot(alice, "09-alice-done")

        for p, own in ((alice, "alice private"), (bob, "bob asks")):
            p.reload(wait_until="load")
            wait_text(p, "#chat-list", own)            # the list is filled after the page loads
        alice_list = alice.inner_text("#chat-list")
        bob_list = bob.inner_text("#chat-list")
        assert "alice private" in alice_list and "bob asks" not in alice_list
        assert "bob asks" in bob_list and "alice private" not in bob_list
        bob.locator("#search input, #search textarea").first.fill("alice")   # words only in alice's chat
        bob.wait_for_function("document.querySelectorAll('#chat-list label').length === 0")
        bob.locator("#search input, #search textarea").first.fill("bob asks")  # the search does find bob's own
        wait_text(bob, "#chat-list", "bob asks")
        shot(bob, "10-bob-history")
    finally:
        for c in contexts:
            c.close()
        srv.stop()


def test_stop_ends_a_long_fast_reply_promptly(browser, tmp_path_factory, demo_model):
    """A backend faster than the page can draw: Stop still ends the reply far short of what was
    asked (the page draws batches of tokens, so Stop does not wait behind a redraw per token)."""
    asked = 20000
    srv = Server(data_dir_with_demo(tmp_path_factory, demo_model, "fast"), "--backend", "fake",
                 "--set", "delay_s=0.002", "--set", f"context_length={3 * asked}").start()   # ~500 tokens a second
    ctx = None
    try:
        ctx, page = fresh_page(browser, srv.url)
        wait_text(page, "#model-status", "Loaded fake-echo with fake")
        open_section(page, "sampling", "System prompt and sampling")
        fill(page, "sampling-max_new_tokens", str(asked))
        send(page, " ".join(f"w{i}" for i in range(asked)))        # echoed back, one word a token
        wait_reply(page, lambda t: t.startswith("w0 w1"))
        page.click("#stop")
        stopped = wait_reply(page, lambda t: "✂ stopped" in t, timeout_s=120)
        written = int(re.search(r"(\d+) reply tokens", stopped).group(1))
        assert 0 < written < asked // 4, stopped[-300:]
        wait_text(page, "#notice", "Stopped.")
        shot(page, "11-fast-reply-stopped")
    finally:
        if ctx is not None:
            ctx.close()
        srv.stop()
