"""The chat store: real SQLite files in a temporary directory."""

from __future__ import annotations

import json

import pytest

from moechat.webui.chats import ChatError, ChatStore, reply_note


@pytest.fixture
def store(tmp_path):
    s = ChatStore.in_data_dir(tmp_path)
    yield s
    s.close()


def test_a_chat_keeps_its_messages_in_order_and_takes_its_title_from_the_first_question(store):
    cid = store.create("")
    store.append(cid, "", "user", "What is the capital of France?")
    store.append(cid, "", "assistant", "Paris.", meta={"backend": "fake", "model": "echo"})
    chat = store.get(cid, "")
    assert chat.title == "What is the capital of France?"
    assert [(m.role, m.content) for m in chat.messages] == [
        ("user", "What is the capital of France?"), ("assistant", "Paris.")]
    assert chat.messages[1].meta["backend"] == "fake"


def test_a_reply_streaming_when_the_server_died_is_marked_cut_on_the_next_start(tmp_path):
    first = ChatStore.in_data_dir(tmp_path)
    cid = first.create("")
    first.append(cid, "", "user", "hello there")
    mid = first.append(cid, "", "assistant", "", status="streaming")
    first.update_message(mid, content="hello")
    # no close: the process is gone as far as the file is concerned
    second = ChatStore.in_data_dir(tmp_path)
    reply = second.get(cid, "").messages[1]
    assert reply.content == "hello"
    assert reply.status == "interrupted" and reply.cut
    assert "server stopped" in reply_note(reply)
    assert second.interrupted_on_open == 1


def test_each_user_sees_only_their_own_chats(store):
    a = store.create("alice")
    store.append(a, "alice", "user", "alice's secret plan")
    b = store.create("bob")
    store.append(b, "bob", "user", "bob's groceries")
    assert [c.title for c in store.list("alice")] == ["alice's secret plan"]
    assert [c.title for c in store.list("bob")] == ["bob's groceries"]
    assert store.list("bob", "secret") == []
    with pytest.raises(ChatError):
        store.get(a, "bob")
    with pytest.raises(ChatError):
        store.delete(a, "bob")
    with pytest.raises(ChatError):
        store.append(a, "bob", "user", "sneaky")
    assert len(store.get(a, "alice").messages) == 1


def test_search_rename_delete(store):
    one = store.create("")
    store.append(one, "", "user", "tell me about the sea")
    store.append(one, "", "assistant", "It is wide and 50% blue_ish")
    two = store.create("")
    store.append(two, "", "user", "a poem about foxes")
    assert [c.id for c in store.list("", "WIDE")] == [one]
    assert [c.id for c in store.list("", "50%")] == [one]
    assert [c.id for c in store.list("", "fox")] == [two]
    assert {c.id for c in store.list("")} == {one, two}
    store.rename(two, "", "  Fox   poems ")
    assert store.get(two, "").title == "Fox poems"
    assert [c.id for c in store.list("", "fox poems")] == [two]
    with pytest.raises(ChatError, match="not empty"):
        store.rename(two, "", "   ")
    store.delete(one, "")
    assert [c.id for c in store.list("")] == [two]
    with pytest.raises(ChatError):
        store.get(one, "")


def test_truncate_and_delete_a_message(store):
    cid = store.create("")
    for i in range(4):
        store.append(cid, "", "user" if i % 2 == 0 else "assistant", f"m{i}")
    store.delete_message(cid, "", 1)
    assert [m.content for m in store.get(cid, "").messages] == ["m0", "m2", "m3"]
    store.truncate(cid, "", 1)
    assert [m.content for m in store.get(cid, "").messages] == ["m0"]
    store.append(cid, "", "assistant", "again")
    assert [m.content for m in store.get(cid, "").messages] == ["m0", "again"]
    with pytest.raises(ChatError, match="no message number 9"):
        store.delete_message(cid, "", 8)


def test_export_markdown_and_json_and_import_round_trip(store):
    cid = store.create("", system_prompt="Answer briefly.")
    store.append(cid, "", "user", "Show code")
    store.append(cid, "", "assistant", "```python\nprint(1)\n```", status="cancelled",
                 meta={"backend": "fake", "model": "fake-echo", "completion_tokens": 3, "prompt_tokens": 2})
    md = store.export_markdown(cid, "")
    assert md.startswith("# Show code\n")
    assert "## System\n\nAnswer briefly." in md
    assert "```python\nprint(1)\n```" in md
    assert "fake · fake-echo" in md and "✂ stopped" in md

    exported = store.export_json(cid, "")
    data = json.loads(exported)
    assert data["format"] == "moechat-chat" and len(data["messages"]) == 2
    new = store.import_json("carol", exported)
    chat = store.get(new, "carol")
    assert chat.title == "Show code" and chat.system_prompt == "Answer briefly."
    assert [(m.role, m.content, m.status) for m in chat.messages] == [
        ("user", "Show code", "done"), ("assistant", "```python\nprint(1)\n```", "cancelled")]
    assert store.list("") and [c.id for c in store.list("carol")] == [new]


def test_import_rejects_files_that_are_not_chats_with_a_sentence(store):
    with pytest.raises(ChatError, match="not JSON"):
        store.import_json("", "this is not json")
    with pytest.raises(ChatError, match="list of messages"):
        store.import_json("", json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    assert store.list("") == []
