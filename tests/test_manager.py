"""The backend manager and its worker processes: crashes, kills, queueing, unload."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from moechat.backends.api import BackendError
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.testing import chat, collect


@pytest.fixture
def manager(tmp_path):
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    yield mgr
    mgr.close()


def test_worker_killed_mid_stream_is_reported_and_the_next_load_works(manager):
    manager.load("fake", {"delay_s": 0.05})
    gen = manager.generate(chat("one two three four five six seven eight nine ten", max_new_tokens=50))
    text = ""
    for ev in gen:
        if ev.kind == "chunk":
            text += ev.text
            if len(text.split()) == 2:
                os.kill(manager._worker.pid, signal.SIGKILL)
        last = ev
    assert text.startswith("one two")
    assert last.finish_reason == "error"
    assert "SIGKILL" in last.error and "load the model again" in last.error
    deadline = time.monotonic() + 10
    while manager.state.status != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.state.status == "failed" and "SIGKILL" in manager.state.error
    _, after = collect(manager.generate(chat("hello")))
    assert after.finish_reason == "error" and "No model is loaded" in after.error
    manager.load("fake", {})
    reply, done = collect(manager.generate(chat("back again")))
    assert reply == "back again" and done.finish_reason == "stop"


def test_backend_that_crashes_itself_mid_generation(manager):
    manager.load("fake", {"crash_after": 2})
    text, last = collect(manager.generate(chat("a b c d e")))
    assert text == "a b"
    assert last.finish_reason == "error" and "killed by SIGKILL" in last.error


def test_a_request_queued_behind_a_crashing_one_is_told_why(manager):
    manager.load("fake", {"delay_s": 0.05, "crash_after": 40})
    words = " ".join(f"w{i}" for i in range(60))
    first_chunk, results = threading.Event(), {}

    def consume(name, gen):
        results[name] = []
        for ev in gen:
            results[name].append(ev)
            first_chunk.set() if ev.kind == "chunk" else None

    first = threading.Thread(target=consume, args=("first", manager.generate(chat(words))))
    first.start()
    assert first_chunk.wait(30)
    second = threading.Thread(target=consume, args=("second", manager.generate(chat("my turn next"))))
    second.start()
    first.join(60)
    second.join(60)
    assert not second.is_alive(), "the queued request hangs"
    assert results["first"][-1].code == "backend_crashed"
    assert [e.position for e in results["second"] if e.kind == "queued"] == [1]   # it was queued
    last = results["second"][-1]
    assert last.kind == "done" and last.finish_reason == "error" and not any(e.text for e in results["second"])
    assert last.error == ("No model is loaded. The fake backend process was killed by SIGKILL. "
                          "Your chats are kept; load the model again to continue.")


def test_failed_load_says_why_and_leaves_nothing_running(manager):
    with pytest.raises(BackendError, match="The GPU is on fire"):
        manager.load("fake", {"fail_load": "The GPU is on fire; let it cool."})
    assert manager.state.status == "failed"
    assert manager._worker is None
    manager.load("fake", {})
    assert manager.state.ready


def test_bad_settings_get_a_sentence(manager):
    with pytest.raises(BackendError, match="delay_s"):
        manager.load("fake", {"delay_s": -1})
    with pytest.raises(BackendError, match="no backend named 'nope'"):
        manager.load("nope", {})


def test_requests_queue_and_a_stop_touches_only_its_own_request(manager):
    manager.load("fake", {"delay_s": 0.05})
    first = manager.generate(chat("alpha beta gamma delta epsilon zeta eta theta"), user="ann")
    second = manager.generate(chat("one two three"), user="bob")
    third = manager.generate(chat("never runs"), user="cy")
    results: dict[str, list] = {}

    def consume(name, gen):
        results[name] = list(gen)

    t1 = threading.Thread(target=consume, args=("first", first))
    t1.start()
    time.sleep(0.15)  # first is generating
    t2 = threading.Thread(target=consume, args=("second", second))
    t2.start()
    time.sleep(0.1)
    t3 = threading.Thread(target=consume, args=("third", third))
    t3.start()
    time.sleep(0.1)
    third.stop()  # cy gives up while queued
    for t in (t1, t2, t3):
        t.join(30)
    text = lambda evs: "".join(e.text for e in evs if e.kind == "chunk")  # noqa: E731
    assert text(results["first"]) == "alpha beta gamma delta epsilon zeta eta theta"
    assert [e.position for e in results["second"] if e.kind == "queued"][0] == 1
    assert text(results["second"]) == "one two three"
    assert results["third"][-1].finish_reason == "cancelled" and text(results["third"]) == ""


def test_unload_ends_the_worker_and_its_memory(manager, contract_model_dir):
    manager.load("transformers", {"model": str(contract_model_dir)})
    pid = manager._worker.pid
    rss = psutil.Process(pid).memory_info().rss
    assert rss > 50e6  # torch + the model really live in the worker, not in this process
    manager.unload()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    mem = manager.stats()["memory"]
    assert mem["worker_exited"] is True
    assert "before_load" in mem and "after_unload" in mem


def test_cancel_a_load(manager):
    result = {}

    def load():
        try:
            manager.load("fake", {"delay_s": 2})
        except BackendError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=load)
    t.start()
    deadline = time.monotonic() + 20
    while (manager._worker is None or manager.state.progress.stage != "Pretending to load") and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = manager._worker.pid
    manager.cancel_load()
    t.join(20)
    assert result["error"] == "Loading was cancelled."
    assert manager.state.status == "failed" and manager._worker is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_app_process_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, tempfile\n"
            "from moechat.backends.manager import BackendManager\n"
            "from moechat.backends.plugins import get_plugin_manager\n"
            "from moechat.backends.testing import chat, collect\n"
            "m = BackendManager(get_plugin_manager(), __import__('pathlib').Path(tempfile.mkdtemp()))\n"
            "m.load('fake', {})\n"
            "print(collect(m.generate(chat('hi there')))[0]); m.close()\n"
            "print(sorted(k for k in ('torch', 'transformers', 'bitsandbytes', 'vllm') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["hi there", "[]"]


def test_worker_runs_under_the_interpreter_the_backend_asks_for(manager, tmp_path):
    """vLLM needs its own environment: a backend may name another Python for its worker."""
    import sys
    wrapper = tmp_path / "other-python"
    wrapper.write_text(f"#!/bin/sh\nexport MOECHAT_FAKE_MARK=other-env\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    info = manager.load("fake", {"python": str(wrapper)})
    assert info["interpreter_mark"] == "other-env"
    assert collect(manager.generate(chat("still works")))[0] == "still works"
    with pytest.raises(BackendError, match="did not start"):
        manager.load("fake", {"python": str(tmp_path / "no-such-python")})


def test_a_consumer_that_stops_reading_after_done_frees_the_queue(manager):
    manager.load("fake", {})
    it = iter(manager.generate(chat("one two")))
    for ev in it:
        if ev.kind == "done":
            break
    closer = threading.Thread(target=it.close)
    closer.start()
    closer.join(10)  # it must not wait for a second 'done' that never comes
    assert not closer.is_alive()
    assert manager.stats()["queue_length"] == 0
    assert collect(manager.generate(chat("three")))[0] == "three"


def test_errors_carry_a_code_the_api_can_answer_with(manager):
    _, last = collect(manager.generate(chat("hello")))
    assert last.code == "model_not_loaded"
    manager.load("fake", {"context_length": 8})
    _, last = collect(manager.generate(chat("one two three four five six seven eight nine")))
    assert last.code == "context_length_exceeded" and "at most 8" in last.error
    manager.load("fake", {"crash_after": 1})
    _, last = collect(manager.generate(chat("a b c")))
    assert last.code == "backend_crashed"


def test_stats_answer_while_a_reply_streams(manager):
    """Live stats on the page: the worker answers mid-reply, with the backend's own keys."""
    manager.load("fake", {"delay_s": 0.1})
    seen = {}
    for ev in manager.generate(chat("one two three four five six")):
        if ev.kind == "chunk" and ev.text.strip() == "three":
            seen = manager.stats(timeout=2)
            assert ev.tokens == 1
    assert 3 <= seen["backend_stats"]["fake_tokens_generated"] < 6  # mid-reply, not after it
    assert seen["queue_length"] == 1  # the reply still running


def test_a_load_probes_the_settings_it_was_given(manager, tmp_path):
    """vLLM's interpreter can be set in the form: the check at load looks at that one, not the default."""
    missing = tmp_path / "vllm-env" / "bin" / "python"
    with pytest.raises(BackendError) as err:
        manager.load("vllm", {"python": str(missing)})
    assert str(missing) in str(err.value) and "python setting" in str(err.value)


def test_a_crash_in_native_code_while_loading_names_the_error_and_where(manager):
    """A backend whose native library crashes (llama.cpp's CUDA build did, on the GPU machine)
    gets a sentence with the signal, the fatal error and the frame it happened in, and the app
    loads something else afterwards."""
    with pytest.raises(BackendError) as err:
        manager.load("fake", {"segfault_on_load": True})
    text = str(err.value)
    assert text.startswith("The fake worker was killed by SIGSEGV while loading: Fatal Python error: "
                           "Segmentation fault (File ")
    assert "moechat_fake" in text and "in load)" in text and text.endswith("Check the settings and load again.")
    manager.load("fake", {})
    reply, _ = collect(manager.generate(chat("still here")))
    assert reply == "still here"
