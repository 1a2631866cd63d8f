"""The page's logic without the page: handlers over a real BackendManager (real worker
processes running the installed ``fake`` plugin), a real SQLite chat store, forms and the
model-folder listing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from moechat.backends.api import Backend, Probe
from moechat.backends.hf_common import HFSettings
from moechat.backends.hookspecs import hookimpl
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.webui import forms
from moechat.webui import handlers as h
from moechat.webui.chats import ChatError, ChatStore
from moechat.webui.models import find_model_folders

LONG = " ".join(f"w{i}" for i in range(1, 31))


# ---- forms and model folders (no processes) ---------------------------------------------------
def test_the_settings_form_follows_the_schema_and_reads_back_typed_values():
    specs = {s.name: s for s in forms.fields_of(HFSettings)}
    assert "model" not in specs                       # the folder picker is shared by every backend
    assert specs["device"].kind == "choice" and specs["device"].choices == ["auto", "cpu", "cuda"]
    assert specs["max_context"].kind == "int" and specs["max_context"].optional
    assert specs["max_context"].minimum == 16
    assert "Most tokens per chat" in specs["max_context"].help
    order = list(specs)
    values = {"device": "cpu", "dtype": "auto", "gpu_memory_gb": "", "cpu_memory_gb": " 12.5 ", "max_context": "256"}
    got = forms.collect([specs[n] for n in order], [values[n] for n in order])
    assert got == {"device": "cpu", "dtype": "auto", "gpu_memory_gb": None, "cpu_memory_gb": 12.5, "max_context": 256}
    assert HFSettings.model_validate(dict(got, model="x")).max_context == 256
    with pytest.raises(ValueError, match="Max context must be a number"):
        forms.to_setting(specs["max_context"], "lots")
    with pytest.raises(ValueError, match="whole number"):
        forms.to_setting(specs["max_context"], "12.5")
    assert forms.to_component(specs["max_context"], None) == ""
    assert forms.to_component(specs["max_context"], 256) == "256"


def test_model_folders_are_found_in_the_models_dir_and_the_hugging_face_cache_layout(tmp_path):
    models = tmp_path / "models"
    for folder in ("plain", "org/nested"):
        (models / folder).mkdir(parents=True)
        (models / folder / "config.json").write_text("{}")
    (models / "not-a-model").mkdir()
    snap = models / "models--Qwen--Tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (models / "models--Qwen--Tiny" / "refs").mkdir()
    (models / "models--Qwen--Tiny" / "refs" / "main").write_text("abc123")
    cache = tmp_path / "hfcache"
    other = cache / "models--org--Other" / "snapshots" / "r1"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")

    found = find_model_folders(models, hf_cache=cache)
    assert [(m.label, Path(m.path)) for m in found] == [
        ("org/nested", models / "org" / "nested"),
        ("org/Other (Hugging Face cache)", other),
        ("plain", models / "plain"),
        ("Qwen/Tiny (Hugging Face cache)", snap),
    ]
    assert find_model_folders(tmp_path / "missing", hf_cache=False) == []


class UnicornBackend(Backend):
    """A backend that cannot run here."""

    name = "unicorn"
    label = "Unicorn"
    description = "Runs on unicorns."

    @classmethod
    def probe(cls) -> Probe:
        return Probe(False, "No unicorn is attached: attach one and restart.")


class UnicornPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register):
        register(UnicornBackend)


def test_the_backend_list_shows_why_a_backend_cannot_run(tmp_path):
    manager = BackendManager(get_plugin_manager([UnicornPlugin]), tmp_path)
    choices = dict((name, label) for label, name in h.backend_choices(manager))
    assert choices["unicorn"] == "Unicorn (unavailable: No unicorn is attached: attach one and restart.)"
    assert choices["fake"] == "Fake: echoes your message (for tests)"
    assert "**Not available here:** No unicorn is attached" in h.backend_help(manager, "unicorn")
    ctx = h.Context(manager, ChatStore.in_data_dir(tmp_path))
    assert list(h.load_steps(ctx, "", "unicorn", "", {})) == [
        "Load failed: The unicorn backend cannot run here: No unicorn is attached: attach one and restart."]


# ---- handlers over a real manager and the fake backend ----------------------------------------
@pytest.fixture(scope="module")
def demo_model(contract_model_dir) -> Path:
    """The demo model, prebuilt once per session (tests/conftest.py); copied into each data dir
    as ``demo-model``, where the app would otherwise build it on first use."""
    return contract_model_dir


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, demo_model):
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(demo_model, home / "demo-model")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECHAT_HOME", str(home))
    mp.setenv("MOECHAT_NO_GPU", "1")
    manager = BackendManager(get_plugin_manager(), home)
    c = h.Context(manager, ChatStore.in_data_dir(home))
    yield c
    manager.close()
    c.store.close()
    mp.undo()


def load_fake(ctx, user="", **settings) -> list[str]:
    return list(h.load_steps(ctx, user, "fake", "", settings, poll_s=0.05))


def turn(ctx, session, chat_id, action, **kw) -> list[h.TurnView]:
    return list(h.run_turn(ctx, "", session, chat_id, action, **kw))


def in_thread(fn):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("result", fn()), daemon=True)
    t.start()
    return t, out


def wait_for(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def test_sending_with_nothing_loaded_says_so_and_stores_nothing(ctx):
    views = turn(ctx, "s0", None, "send", text="hello?")
    assert len(views) == 1 and not views[0].accepted
    assert views[0].notice == "No model is loaded. Choose a backend and a model folder, then press Load."
    assert ctx.store.list("") == []


def test_a_bad_folder_is_refused_with_a_sentence_before_anything_is_unloaded(ctx):
    lines = list(h.load_steps(ctx, "", "transformers", "/nonexistent/folder", {}))
    assert lines == ["Load failed: The model folder /nonexistent/folder does not exist."]
    assert ctx.manager.state.status == "empty"


def test_loading_shows_the_stage_and_progress_then_what_is_loaded(ctx):
    lines = load_fake(ctx, delay_s=0.3)
    assert any("Pretending to load" in line and "of 3 steps" in line for line in lines), lines
    assert lines[-1].startswith("Loaded **fake-echo** with **fake**")
    assert "Loaded **fake-echo**" in h.progress_text(ctx.manager)


def test_a_reply_streams_into_the_chat_and_is_stored_with_its_numbers(ctx):
    load_fake(ctx, delay_s=2 * h.turns.DRAW_EVERY_S)                  # slower than the page redraws
    views = turn(ctx, "s1", None, "send", text="the quick brown fox", sampling={"max_new_tokens": 64},
                 system_prompt="Be brief.")
    cid = views[-1].chat_id
    partial = [v.messages[-1]["content"] for v in views if v.notice == "Writing …"]
    assert partial[0].startswith("the\n") and len(partial) >= 2       # it streams
    final = views[-1].messages[-1]["content"]
    assert final.startswith("the quick brown fox\n\n<sub>fake · fake-echo")
    assert "4 reply tokens" in final and "tok/s" in final
    chat = ctx.store.get(cid, "")
    assert chat.system_prompt == "Be brief."
    assert [(m.role, m.content, m.status) for m in chat.messages] == [
        ("user", "the quick brown fox", "done"), ("assistant", "the quick brown fox", "stop")]
    assert chat.messages[1].meta["backend"] == "fake" and chat.messages[1].meta["completion_tokens"] == 4
    assert views[-1].live["tokens"] == 4

    views = turn(ctx, "s1", cid, "send", text="x" * 3, sampling={"temperature": 9})
    assert not views[0].accepted and "temperature" in views[0].notice


def test_stop_ends_only_that_sessions_reply_and_keeps_what_was_written(ctx):
    load_fake(ctx, delay_s=0.1)
    views: list[h.TurnView] = []
    t, _ = in_thread(lambda: [views.append(v) for v in h.run_turn(ctx, "", "s2", None, "send", text=LONG)])
    wait_for(lambda: any(v.notice == "Writing …" for v in views), "the reply started")
    assert h.stop(ctx, "someone-else") == "Nothing to stop."
    assert h.stop(ctx, "s2") == "Stopping …"
    t.join(30)
    assert views[-1].notice == "Stopped."
    reply = ctx.store.get(views[-1].chat_id, "").messages[-1]
    assert reply.status == "cancelled" and reply.cut
    assert reply.content.startswith("w1") and "w30" not in reply.content
    assert "✂ stopped" in views[-1].messages[-1]["content"]


def test_a_fast_reply_is_redrawn_in_batches_and_always_ends_whole(ctx):
    """Every redraw sends the whole chat to the browser: a backend faster than that is drawn a
    batch of tokens at a time, each drawing showing the reply so far, and the last one all of it."""
    load_fake(ctx)                                             # no delay: as fast as the pipe goes
    words = " ".join(f"w{i}" for i in range(3000))
    views = turn(ctx, "s2f", None, "send", text=words, sampling={"max_new_tokens": 3000})
    writing = [v.messages[-1]["content"].split("\n\n<sub>")[0] for v in views if v.notice == "Writing …"]
    assert 0 < len(writing) < 3000 / 20                        # not one drawing per token
    assert all(a != b and b.startswith(a) for a, b in zip(writing, writing[1:]))   # each shows more
    assert writing[0].startswith("w0")
    assert views[-1].messages[-1]["content"].startswith(words + "\n")          # the whole reply, then its numbers
    assert ctx.store.get(views[-1].chat_id, "").messages[-1].content == words


def test_a_second_person_is_queued_and_their_stop_leaves_the_first_alone(ctx):
    load_fake(ctx, delay_s=0.05)
    first: list[h.TurnView] = []
    second: list[h.TurnView] = []
    t1, _ = in_thread(lambda: [first.append(v) for v in h.run_turn(ctx, "", "a", None, "send", text=LONG)])
    wait_for(lambda: any(v.notice == "Writing …" for v in first), "the first reply started")
    t2, _ = in_thread(lambda: [second.append(v) for v in h.run_turn(ctx, "", "b", None, "send", text="me too")])
    wait_for(lambda: any(v.notice.startswith("Queued: 1 request ahead of yours") for v in second), "b was queued")
    h.stop(ctx, "b")
    t2.join(30)
    t1.join(30)
    assert second[-1].notice == "Stopped before the reply started."
    assert [m["role"] for m in second[-1].messages] == ["user"]            # no empty reply left behind
    reply = ctx.store.get(first[-1].chat_id, "").messages[-1]
    assert reply.status == "stop" and reply.content == LONG


def test_a_load_waits_for_the_reply_being_written_and_leaves_it_whole(ctx):
    load_fake(ctx, delay_s=0.1)
    views: list[h.TurnView] = []
    t1, _ = in_thread(lambda: [views.append(v) for v in h.run_turn(ctx, "", "c", None, "send", text=LONG)])
    wait_for(lambda: any(v.notice == "Writing …" for v in views), "the reply started")
    lines: list[str] = []
    t2, _ = in_thread(lambda: lines.extend(load_fake(ctx, delay_s=0.0)))
    wait_for(lambda: bool(lines), "the load said something")
    assert lines[0] == "Waiting for the replies being written to finish, then loading with fake …"
    t1.join(30)
    t2.join(30)
    reply = ctx.store.get(views[-1].chat_id, "").messages[-1]
    assert reply.status == "stop" and reply.content == LONG
    assert lines[-1].startswith("Loaded **fake-echo**")


def test_regenerate_continue_edit_and_delete(ctx):
    load_fake(ctx, delay_s=0.0)
    views = turn(ctx, "s3", None, "send", text="alpha beta gamma delta", sampling={"max_new_tokens": 2})
    cid = views[-1].chat_id
    reply = ctx.store.get(cid, "").messages[-1]
    assert (reply.content, reply.status) == ("alpha beta", "length")
    assert views[-1].notice.startswith("The reply reached the token limit")

    turn(ctx, "s3", cid, "continue", sampling={"max_new_tokens": 2})
    msgs = ctx.store.get(cid, "").messages
    assert len(msgs) == 2 and msgs[-1].content == "alpha betaalpha beta"   # the same reply, continued

    turn(ctx, "s3", cid, "regenerate", sampling={"max_new_tokens": 64})
    msgs = ctx.store.get(cid, "").messages
    assert [(m.role, m.content) for m in msgs] == [("user", "alpha beta gamma delta"),
                                                   ("assistant", "alpha beta gamma delta")]

    turn(ctx, "s3", cid, "send", text="second question")
    views = turn(ctx, "s3", cid, "edit", index=0, text="edited first")
    msgs = ctx.store.get(cid, "").messages
    assert [(m.role, m.content) for m in msgs] == [("user", "edited first"), ("assistant", "edited first")]
    assert not turn(ctx, "s3", cid, "edit", index=1, text="not mine")[0].accepted   # replies are not edited

    assert h.delete_message(ctx, "", cid, 1) == "Deleted message 2."
    assert [m.content for m in ctx.store.get(cid, "").messages] == ["edited first"]
    assert "nothing to continue" not in turn(ctx, "s3", cid, "continue")[0].notice
    assert turn(ctx, "s3", cid, "continue")[0].notice == "There is no reply to continue; send a message first."


def test_a_prompt_longer_than_the_context_is_refused_with_a_sentence(ctx):
    load_fake(ctx, context_length=8)
    views = turn(ctx, "s4", None, "send", text=LONG)
    assert views[-1].notice == ("The prompt is 30 tokens but this model takes at most 8 tokens, prompt and reply "
                                "together. Shorten the chat or start a new one.")
    assert [(m["role"], m["content"]) for m in views[-1].messages] == [("user", LONG)]


def test_a_prompt_of_far_more_characters_than_the_context_holds_is_refused_before_it_is_tokenized(ctx):
    """One "word" is one token to the fake backend, so by tokens alone these prompts fit; by
    characters the second cannot (no prompt averages more than MAX_CHARS_PER_TOKEN a token)."""
    from moechat.backends.worker import MAX_CHARS_PER_TOKEN
    load_fake(ctx, context_length=8)
    limit = 8 * MAX_CHARS_PER_TOKEN
    views = turn(ctx, "s4c", None, "send", text="x" * limit)
    assert views[-1].notice == "" and views[-1].messages[-1]["content"].startswith("x" * limit)
    counted = ctx.manager.stats()["backend_stats"]["fake_prompt_chars_counted"]
    assert counted >= limit

    views = turn(ctx, "s4c", None, "send", text="y" * (limit + 1))
    assert views[-1].notice == (f"The prompt is {limit + 1:,} characters but this model takes at most 8 tokens, "
                                f"prompt and reply together, and no text of more than {limit:,} characters fits "
                                "in that. Shorten the chat or start a new one.")
    assert [m["role"] for m in views[-1].messages] == ["user"]       # no reply, the text is kept
    assert ctx.manager.stats()["backend_stats"]["fake_prompt_chars_counted"] == counted   # never tokenized


def test_a_load_that_fails_says_why(ctx):
    lines = load_fake(ctx, fail_load="The pretend disk is full.")
    assert lines[-1] == "Load failed: The pretend disk is full."
    assert "The pretend disk is full." in h.progress_text(ctx.manager)
    views = turn(ctx, "s5", None, "send", text="anyone?")
    assert "The last load failed: The pretend disk is full." in views[0].notice


def test_a_backend_crash_mid_reply_keeps_what_was_written_and_says_so(ctx):
    load_fake(ctx, crash_after=3)
    views = turn(ctx, "s7", None, "send", text=LONG)
    reply = ctx.store.get(views[-1].chat_id, "").messages[-1]
    assert reply.content == "w1 w2 w3" and reply.status == "error"
    assert views[-1].notice.startswith("The fake backend process was killed by SIGKILL while generating.")
    assert "✂ cut off by an error" in views[-1].messages[-1]["content"]
    wait_for(lambda: ctx.manager.state.status == "failed", "the manager noticed the crash")
    assert h.progress_text(ctx.manager).startswith("Nothing is loaded. The fake backend process was killed")


def test_a_load_can_be_cancelled(ctx):
    lines: list[str] = []
    t, _ = in_thread(lambda: lines.extend(load_fake(ctx, delay_s=2)))
    wait_for(lambda: ctx.manager.state.status == "loading" and ctx.manager.state.progress
             and "Pretending" in ctx.manager.state.progress.stage, "the load started")
    assert h.cancel_load(ctx, "") == "Cancelling the load …"
    t.join(30)
    assert lines[-1] == "Loading was cancelled; nothing is loaded."
    assert ctx.manager.state.status != "ready"


def test_a_plan_that_does_not_fit_is_refused_before_unloading_unless_forced(ctx, monkeypatch):
    load_fake(ctx)
    monkeypatch.setenv("MOECHAT_HOST_RAM_GB", "0.01")
    lines = list(h.load_steps(ctx, "", "transformers", "", {"device": "cpu"}))
    assert lines[-1].startswith("Load failed: This does not fit.") and "with force" in lines[-1]
    assert ctx.manager.state.backend == "fake" and ctx.manager.state.ready      # still loaded
    lines = list(h.load_steps(ctx, "", "transformers", "", {"device": "cpu"}, force=True))
    assert lines[-1].startswith("Loaded **demo-model** with **transformers**")
    assert "Memory plan: This does not fit." in lines[-1]


def test_only_admins_may_load_when_admins_are_named(ctx):
    limited = h.Context(ctx.manager, ctx.store, admins={"alice"})
    assert list(h.load_steps(limited, "bob", "fake", "", {})) == [
        "Only alice can load, unload or plan models here; ask them to change the model."]
    assert h.unload(limited, "bob").startswith("Only alice")
    assert h.cancel_load(limited, "bob").startswith("Only alice")
    assert h.plan_preview(limited, "bob", "transformers", "/etc", {}).startswith("Only alice")
    assert h.may_manage(limited, "alice") and h.may_manage(ctx, "anyone")


def test_live_stats_show_speed_memory_and_the_backends_own_keys(ctx):
    load_fake(ctx, delay_s=0.0)
    turn(ctx, "s6", None, "send", text="count these words please")
    ctx._stats_at = 0.0
    md = h.stats_markdown(ctx)
    assert "| fake tokens generated | 4 |" in md
    assert "| GPU memory | no GPU |" in md
    assert "worker host memory | " in md and "worker host memory | – |" not in md
    assert "tok/s (last reply)" in md
    assert h.speed_history(ctx)[-1]["tok/s"] > 0


def test_chats_of_one_user_are_invisible_to_another_and_export_import(ctx, tmp_path):
    cid = ctx.store.create("alice")
    ctx.store.append(cid, "alice", "user", "alice only")
    assert h.chat_choices(ctx, "bob") == []
    with pytest.raises(ChatError):
        h.open_chat(ctx, "bob", cid)
    with pytest.raises(ChatError):
        h.export_chat(ctx, "bob", cid, "json")
    path = h.export_chat(ctx, "alice", cid, "json")
    assert Path(path).name == "alice-only.json"
    assert json.loads(Path(path).read_text())["messages"][0]["content"] == "alice only"
    md = Path(h.export_chat(ctx, "alice", cid, "md")).read_text()
    assert md.startswith("# alice only")
    new = h.import_chat(ctx, "bob", path)
    assert h.open_chat(ctx, "bob", new)[0] == [{"role": "user", "content": "alice only"}]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ChatError, match="list of messages"):
        h.import_chat(ctx, "bob", str(bad))


def test_the_plan_is_shown_before_loading_and_bad_settings_get_a_sentence(ctx):
    preview = h.plan_preview(ctx, "", "transformers", "", {"device": "cpu"})
    assert "| RAM |" in preview and "This fits." in preview
    assert h.plan_preview(ctx, "", "fake", "", {}) == "The fake backend gives no memory plan for this model."
    assert list(h.load_steps(ctx, "", "fake", "", {"delay_s": -1}))[-1].startswith(
        "Load failed: Some settings are not valid. delay_s:")


def test_model_folders_outside_the_models_folders_are_refused_without_saying_whether_they_exist(ctx, tmp_path):
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (models / "m" / "config.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    limited = h.Context(ctx.manager, ctx.store, folder_roots=[models])
    answers = set()
    for folder in (tmp_path / "elsewhere", tmp_path / "missing", "/etc", str(models / ".." / "elsewhere")):
        load = list(h.load_steps(limited, "", "transformers", str(folder), {"device": "cpu"}))
        plan = h.plan_preview(limited, "", "transformers", str(folder), {"device": "cpu"})
        assert load == [f"Load failed: {plan}"] and "only from the models folders" in plan
        answers.add(plan)
    assert len(answers) == 1                       # the same sentence for a folder that exists and one that does not
    inside = h.plan_preview(limited, "", "transformers", str(models / "m"), {"device": "cpu"})
    assert "only from the models folders" not in inside
    assert "only from the models folders" not in h.plan_preview(limited, "", "transformers", "", {"device": "cpu"})


def test_a_loader_cannot_set_operator_only_settings(ctx):
    """The fake backend's ``python`` names a program: only the operator's value counts."""
    import sys
    operator = h.Context(ctx.manager, ctx.store, operator_settings={"python": sys.executable})
    specs = [s.name for s in forms.fields_of(ctx.manager.backends()["fake"].cls.Settings)]
    assert "python" not in specs and "delay_s" in specs
    lines = list(h.load_steps(operator, "", "fake", "", {"python": "/bin/false", "delay_s": 0.0}, poll_s=0.05))
    assert lines[-1].startswith("Loaded **fake-echo**"), lines
    assert ctx.manager.state.settings["python"] == sys.executable
    lines = list(h.load_steps(ctx, "", "fake", "", {"python": "/bin/false"}, poll_s=0.05))
    assert lines[-1].startswith("Loaded **fake-echo**") and ctx.manager.state.settings["python"] == ""


def test_a_secret_setting_is_write_only_in_the_form():
    from moechat_remote import RemoteSettings
    from pydantic import SecretStr

    specs = {s.name: s for s in forms.fields_of(RemoteSettings)}
    assert "allowed_urls" not in specs and specs["api_key"].kind == "secret" and specs["api_key"].default == ""
    shown = forms.to_component(specs["api_key"], SecretStr("sk-hidden"))
    assert shown["value"] == "" and shown["placeholder"] == forms.SECRET_SET
    assert forms.to_component(specs["api_key"], SecretStr(""))["placeholder"] == forms.SECRET_EMPTY
    assert forms.to_setting(specs["api_key"], " sk-new ") == "sk-new"


def test_text_that_is_not_valid_unicode_is_refused_before_a_chat_is_made(ctx):
    load_fake(ctx, delay_s=0.0)
    before = len(ctx.store.list("", ""))
    views = turn(ctx, "s-surrogate", None, "send", text="hello \ud800 there")
    assert len(views) == 1 and not views[0].accepted and "lone UTF-16 surrogate" in views[0].notice
    assert views[0].chat_id is None and len(ctx.store.list("", "")) == before


def test_load_warnings_reach_the_person():
    info = {"wrong_output": True, "warnings": ["Offload did not happen."], "plan_check": "Memory differs."}
    assert h.load_warnings(info) == [
        "this backend failed its output self-check: its replies are likely garbage.",
        "Offload did not happen.", "Memory differs."]
    assert h.load_warnings({}) == []


def test_the_handlers_and_the_page_modules_import_without_gradio():
    """The logic is plain functions: importing it (and the page's parts) loads no Gradio, pandas or torch."""
    import subprocess
    import sys
    code = ("import sys, moechat.webui.handlers, moechat.webui.app, moechat.webui.page.loading, "
            "moechat.webui.page.turns, moechat.webui.page.stats, moechat.webui.page.chats; "
            "print(sorted(m for m in ('gradio', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
