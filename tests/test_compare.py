"""Comparing presets without the page: ``moechat compare`` as a real subprocess (real worker
processes, the tiny demo model with transformers, the fake plugin, real SQLite), and the page's
compare handlers over a real BackendManager (who may run one, what comes back afterwards)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.webui import compare as cmp
from moechat.webui.chats import ChatStore
from moechat.webui.handlers import compare as hcmp
from moechat.webui.handlers.context import Context
from moechat.webui.handlers.loading import load_steps

MOECHAT = str(Path(sys.executable).parent / "moechat")
FAIL = "This preset is set to fail."


def moechat(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOECHAT_HOME=str(home), MOECHAT_NO_GPU="1", HF_HUB_OFFLINE="1")
    env.pop("MOECHAT_PLUGINS", None)
    out = subprocess.run([MOECHAT, "--log-level", "WARNING", "compare", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode not in (0, 1):
        raise AssertionError(f"moechat compare {' '.join(args)} exited {out.returncode}:\n{out.stderr}")
    return out


def test_the_cli_saves_presets_runs_them_in_turn_and_writes_json_markdown_and_sqlite(tmp_path, contract_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    model = str(contract_model_dir)
    assert "Saved the preset tiny (transformers, " in moechat(
        home, "--save", "tiny", "--backend", "transformers", "--model", model, "--set", "device=cpu").stdout
    moechat(home, "--save", "echo", "--backend", "fake")
    moechat(home, "--save", "broken", "--backend", "fake", "--set", f"fail_load={FAIL}")
    moechat(home, "--save", "keyed", "--backend", "remote", "--set", "base_url=http://127.0.0.1:9/v1",
            "--set", 'allowed_urls=["http://127.0.0.1:9/v1"]', "--set", "api_key=sk-123")
    refused = moechat(home, "--save", "bad", "--backend", "fake", "--set", "delay_s=-1", check=False)
    assert refused.returncode == 2 and "delay_s: Input should be greater than or equal to 0" in refused.stderr
    unknown = moechat(home, "tiny", "nosuch", "--prompt", "hi", check=False)
    assert unknown.returncode == 2 and "There is no preset named 'nosuch'" in unknown.stderr
    listed = moechat(home, "--list").stdout
    assert "sk-123" not in listed and "'api_key': '(hidden)'" in listed

    out = moechat(home, "tiny", "broken", "echo", "--prompt", "Hello! How are you today?", "--max-new-tokens", "8",
                  "--json", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "run.md"))
    assert out.returncode == 1                       # one entry failed
    data = json.loads((tmp_path / "run.json").read_text())
    tiny, broken, echo = data["entries"]
    assert [e["preset"] for e in data["entries"]] == ["tiny", "broken", "echo"]
    assert tiny["status"] == "done" and tiny["completion_tokens"] == 8 and tiny["text"]
    assert tiny["decode_tok_s"] > 0 and tiny["load_time_s"] > 0 and tiny["peak_host_bytes"] > 0
    assert tiny["selfcheck"]["passed"] is False      # random weights: the self-check says garbage
    assert broken["status"] == "failed" and broken["error"] == f"Load failed: {FAIL}"
    assert echo["status"] == "done" and echo["text"] == "Hello! How are you today?"
    assert data["reference"] == "tiny" and echo["first_diff"] == 0 and echo["same_as_reference"] is False
    assert data["commit"]["git_commit"] and data["machine"]["cpu"]
    assert data["status"] == "done" and data["note"] == "Nothing is loaded now."

    md = (tmp_path / "run.md").read_text()
    assert "| first difference | reference | – | differs from tiny at token 0 |" in md
    assert f"Load failed: {FAIL}" in md and "Hello! How are you today?" in md
    assert "differs from tiny at token 0" in out.stdout

    with sqlite3.connect(home / "compare.sqlite3") as db:
        rows = db.execute("SELECT presets, prompt, git_commit, machine, status FROM runs").fetchall()
    assert len(rows) == 1
    presets, prompt, commit, machine, status = rows[0]
    assert json.loads(presets) == ["tiny", "broken", "echo"] and prompt == "Hello! How are you today?"
    assert commit == data["commit"]["git_commit"] and json.loads(machine)["cpu"] and status == "done"


def test_a_credential_in_a_preset_is_used_but_never_listed_stored_with_a_run_or_exported(tmp_path):
    store = cmp.CompareStore.in_data_dir(tmp_path)
    manager = BackendManager(get_plugin_manager(), tmp_path)
    store.save_preset(cmp.Preset("keyed", "remote", {"api_key": "sk-secret", "model": "m"}))
    assert store.preset("keyed").settings["api_key"] == "sk-secret"     # kept for loading
    shown = cmp.public_settings(manager, store.preset("keyed"))
    assert shown == {"api_key": "(hidden)", "model": "m"}               # the SecretStr field, by type
    gone = cmp.public_settings(manager, cmp.Preset("gone", "not-installed", {"token": "t", "model": "m"}))
    assert gone == {"token": "(hidden)", "model": "m"}                  # unknown fields: all hidden
    run = cmp.CompareRun("hi", [{"role": "user", "content": "hi"}], {}, [
        cmp.EntryResult("keyed", "remote", "", shown)])
    store.save_run(run)
    assert "sk-secret" not in cmp.to_json(run) and "sk-secret" not in cmp.to_markdown(run)
    with sqlite3.connect(tmp_path / "compare.sqlite3") as db:
        stored = db.execute("SELECT result FROM runs").fetchone()[0]
    assert "sk-secret" not in stored and '"api_key": "(hidden)"' in stored


# ---- the page's handlers ------------------------------------------------------------------------
@pytest.fixture
def ctx(tmp_path, contract_model_dir):
    shutil.copytree(contract_model_dir, tmp_path / "demo-model")
    manager = BackendManager(get_plugin_manager(), tmp_path)
    c = Context(manager, ChatStore.in_data_dir(tmp_path), admins={"boss"})
    yield c
    manager.close()


def test_only_those_who_may_load_may_compare_and_the_previous_backend_comes_back(ctx):
    assert hcmp.save_preset(ctx, "guest", "echo", "fake", "", {}) == (
        "Only boss can load, unload or plan models here; ask them to change the model.")
    assert hcmp.save_preset(ctx, "boss", "echo", "fake", "", {}) == "Saved the preset echo (fake)."
    assert hcmp.save_preset(ctx, "boss", "slow", "fake", "", {"delay_s": 0.01}) == "Saved the preset slow (fake)."
    assert hcmp.save_preset(ctx, "boss", "no good", "fake", "", {}).startswith("Give the preset a name")
    refused = list(hcmp.run_compare(ctx, "guest", ["echo", "slow"], "hi"))
    assert refused == [("Only boss can load, unload or plan models here; ask them to change the model.", None)]
    assert hcmp.cancel_compare(ctx, "guest").startswith("Only boss")
    assert list(hcmp.run_compare(ctx, "boss", ["echo"], "  ")) == [("Type a prompt (or use the open chat) first.", None)]

    # something else is loaded before: the fake backend with a mark in its settings
    assert list(load_steps(ctx, "boss", "fake", "", {"context_length": 999}, poll_s=0.05))[-1].startswith("Loaded")
    views = list(hcmp.run_compare(ctx, "boss", ["echo", "slow"], "one two three", poll_s=0.05))
    line, run = views[-1]
    assert line == "Comparison finished. Loaded the fake backend loaded before the comparison again."
    assert [e.status for e in run.entries] == ["done", "done"]
    assert run.entries[1].same_as_reference is True
    assert "same as echo" in hcmp.results_html(run)
    assert ctx.manager.state.ready and ctx.manager.state.settings["context_length"] == 999
    # the run is the person's own
    assert [label for label, _ in hcmp.run_choices(ctx, "boss")][0].endswith("echo, slow · one two three")
    assert hcmp.run_choices(ctx, "guest") == []
    path = hcmp.export_run(ctx, "boss", run.id, "json")
    assert json.loads(Path(path).read_text())["entries"][1]["text"] == "one two three"
    with pytest.raises(cmp.CompareError, match="does not exist"):
        hcmp.export_run(ctx, "guest", run.id, "md")


def test_model_output_is_escaped_and_the_first_difference_is_marked():
    a = cmp.EntryResult("a", "fake", "", {}, status="done", text="x <b>y</b>", pieces=["x", " <b>y</b>"],
                        piece_tokens=[1, 1])
    b = cmp.EntryResult("b", "fake", "", {}, status="done", text="x <i>z", pieces=["x", " <i>z"], piece_tokens=[1, 1])
    run = cmp.CompareRun("p", [{"role": "user", "content": "p"}], {}, [a, b])
    cmp.mark_differences(run)
    assert b.first_diff == 1
    page = hcmp.results_html(run)
    assert "<b>" not in page and "&lt;b&gt;y&lt;/b&gt;" in page
    assert 'x<mark class="first-diff" title="first difference"> &lt;i&gt;z</mark>' in page


def test_while_a_comparison_runs_load_and_unload_wait_and_cancel_stops_it(ctx):
    assert hcmp.save_preset(ctx, "boss", "slow", "fake", "", {"delay_s": 0.2}).startswith("Saved")
    assert hcmp.save_preset(ctx, "boss", "echo", "fake", "", {}).startswith("Saved")
    views = hcmp.run_compare(ctx, "boss", ["slow", "echo"], " ".join(f"w{i}" for i in range(40)), poll_s=0.05)
    for line, run in views:
        if run is not None and run.entries[0].status == "generating" and run.entries[0].text:
            break
    assert list(load_steps(ctx, "boss", "fake", "", {})) == [
        "A comparison is running: it loads each of its presets in turn. Wait for it to finish, "
        "or press Cancel under Compare."]
    assert hcmp.cancel_compare(ctx, "boss") == "Cancelling the comparison …"
    line, run = list(views)[-1]
    assert line == "Comparison cancelled. Nothing was loaded before the comparison, so nothing is loaded now."
    assert [e.status for e in run.entries] == ["cancelled", "cancelled"]
    assert run.entries[0].text.startswith("w0") and "w39" not in run.entries[0].text
    assert not ctx.manager.state.ready
    assert hcmp.cancel_compare(ctx, "boss") == "No comparison is running."


def test_the_open_chat_so_far_can_be_the_prompt(ctx):
    assert hcmp.save_preset(ctx, "boss", "echo", "fake", "", {}).startswith("Saved")
    chat = ctx.store.create("boss", system_prompt="Be brief.")
    ctx.store.append(chat, "boss", "user", "first question")
    ctx.store.append(chat, "boss", "assistant", "first answer")
    ctx.store.append(chat, "boss", "user", "the follow-up")
    line, run = list(hcmp.run_compare(ctx, "boss", ["echo"], "", chat_id=chat, use_chat=True, poll_s=0.05))[-1]
    assert [m["content"] for m in run.messages] == ["Be brief.", "first question", "first answer", "the follow-up"]
    assert run.entries[0].text == "the follow-up"            # the fake backend echoes the last user message
    assert list(hcmp.run_compare(ctx, "guest2", ["echo"], "", chat_id=chat, use_chat=True))[-1][0].startswith("Only boss")
    assert list(hcmp.run_compare(ctx, "boss", ["echo"], "", use_chat=True)) == [
        ("Open a chat first, or untick \u201cUse the open chat\u201d and type a prompt.", None)]
