"""The remote backend plugin (plugins/moechat-remote), installed as a user installs it, driving a
second ``moechat serve`` (the fake backend) over real HTTP on loopback."""

from __future__ import annotations

import ast
import subprocess
import time
from importlib.metadata import distribution, entry_points
from pathlib import Path

import openai
import pytest

from moechat.backends.api import BackendError
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.testing import BackendContract, chat, collect
from browser_helpers import MOECHAT, ROOT, Server, free_port
from test_api import KEY, get_json, start, wait_for_status

UPSTREAM_PORT = free_port()
UPSTREAM = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
UPSTREAM_ARGS = ("--backend", "fake", "--set", "delay_s=0.02")
FRONT_KEY = "sk-front"
LONG = " ".join(f"w{i}" for i in range(200))  # echoed back by the fake upstream in about 4 s
DEAD = f"http://127.0.0.1:{free_port()}/v1"    # nothing listens there


@pytest.fixture(scope="module", autouse=True)
def allowed_urls():
    """The operator allows the upstream and the dead address (every server started here inherits it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECHAT_REMOTE_ALLOWED_URLS", f"{UPSTREAM},{DEAD}")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The bigger server: a moechat serve with the fake backend, needing KEY."""
    server = start(tmp_path_factory, "upstream", *UPSTREAM_ARGS, port=UPSTREAM_PORT)
    yield server
    server.stop()


def wait_idle(server: Server, key: str = KEY) -> dict:
    """The server's stats once its queue is empty and it has finished a generation."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, stats = get_json(server.url + "v1/stats", key)
        if stats["queue_length"] == 0 and stats["last"]:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"{server.url} stayed busy: {stats}")


def test_installed_as_a_plugin_the_way_a_user_installs_it():
    dist = distribution("moechat-remote")  # pip install -e plugins/moechat-remote
    assert [ep.value for ep in entry_points(group="moechat.backends") if ep.name == "remote"] == ["moechat_remote"]
    assert dist.metadata["Name"] == "moechat-remote"
    listing = subprocess.run([MOECHAT, "plugins"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith("remote "))
    assert "OpenAI-compatible server" in line and "[remote: moechat-remote 0.1.0] ready" in line


def test_built_only_on_the_public_plugin_api():
    source = Path(ROOT, "plugins/moechat-remote/moechat_remote/__init__.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    moechat_modules = {m for m in imported if m.startswith(("moechat.backends", "moechat.webui"))}
    assert moechat_modules == {"moechat.backends.api", "moechat.backends.hookspecs"}


def test_probe_reaches_the_server_or_says_why(upstream, monkeypatch):
    entry = get_plugin_manager().backend("remote")
    monkeypatch.setenv("MOECHAT_REMOTE_URL", UPSTREAM)
    monkeypatch.setenv("MOECHAT_REMOTE_API_KEY", KEY)
    probe = entry.probe()
    assert probe.available and "fake-echo" in probe.reason
    monkeypatch.setenv("MOECHAT_REMOTE_API_KEY", "wrong")
    probe = entry.probe()
    assert not probe.available and "refused the API key" in probe.reason and "set api_key" in probe.reason
    monkeypatch.setenv("MOECHAT_REMOTE_URL", f"http://127.0.0.1:{free_port()}")
    probe = entry.probe()
    assert not probe.available and probe.reason.startswith("Cannot reach the server at http://127.0.0.1:")


def test_load_refusals_are_sentences_and_the_key_can_come_from_the_environment(upstream, tmp_path, monkeypatch):
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    try:
        cases = [({"api_key": "wrong"}, "refused the API key"),
                 ({}, "needs an API key"),
                 ({"api_key": KEY, "model_name": "nope"}, "does not serve 'nope'; it serves fake-echo"),
                 ({"base_url": DEAD.removeprefix("http://").removesuffix("/v1")}, "Cannot reach the server")]
        for settings, sentence in cases:
            with pytest.raises(BackendError, match=sentence):
                mgr.load("remote", {"base_url": UPSTREAM, **settings})
            assert mgr.state.status == "failed" and sentence.split(";")[0] in mgr.state.error
        monkeypatch.setenv("MOECHAT_REMOTE_API_KEY", KEY)  # kept out of the settings (and the page's form)
        mgr.load("remote", {"base_url": UPSTREAM})
        assert mgr.state.settings["api_key"].get_secret_value() == ""
        assert collect(mgr.generate(chat("hello there")))[0] == "hello there"
    finally:
        mgr.close()


def test_a_base_url_the_operator_did_not_allow_is_refused_before_any_connection(upstream, tmp_path, monkeypatch):
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    try:
        other = f"127.0.0.1:{free_port()}"
        for url in ("http://" + other + "/v1", other, "http://user@" + UPSTREAM[7:]):
            with pytest.raises(BackendError, match="Some settings are not valid. .*(is not one the operator allowed"
                                                   "|not a plain http)"):
                mgr.load("remote", {"base_url": url, "api_key": KEY})
            assert mgr.state.status != "loading" and mgr.state.settings.get("base_url") != url
        # the operator's list (the environment or `moechat serve --set allowed_urls=...`) decides
        monkeypatch.delenv("MOECHAT_REMOTE_ALLOWED_URLS")
        with pytest.raises(BackendError, match="is not one the operator allowed"):
            mgr.load("remote", {"base_url": UPSTREAM, "api_key": KEY})
        mgr.load("remote", {"base_url": UPSTREAM, "api_key": KEY, "allowed_urls": [UPSTREAM]})
        assert mgr.state.status == "ready"
    finally:
        mgr.close()


class TestRemoteContract(BackendContract):
    """The contract every backend passes, with the remote one talking to the fake upstream."""

    backend = "remote"
    uses_model_folder = False
    settings = {"base_url": UPSTREAM, "api_key": KEY, "timeout_s": 60}

    @pytest.fixture(scope="class", autouse=True)
    def _upstream(self, upstream):
        return upstream

    def test_stats_measured_from_the_stream(self, manager):
        text, last = collect(manager.generate(chat("one two three four five", max_new_tokens=50)))
        assert text == "one two three four five" and last.finish_reason == "stop"
        assert last.usage["completion_tokens"] == 5 and last.usage["prompt_tokens"] == 5
        assert last.usage["ttft_s"] > 0 and last.usage["decode_tok_s"] > 0
        stats = manager.stats()
        assert stats["backend_stats"]["remote_model"] == "fake-echo"
        assert stats["backend_stats"]["server_decode_tok_s"] > 0


@pytest.fixture(scope="module")
def front(upstream, tmp_path_factory):
    """The first app: moechat serve with the remote backend pointed at the upstream."""
    server = Server(tmp_path_factory.mktemp("front"), "--api-key", FRONT_KEY, "--backend", "remote",
                    "--set", f"base_url={UPSTREAM}", "--set", f"api_key={KEY}").start()
    try:
        assert wait_for_status(server, "ready", "failed", key=FRONT_KEY)["status"] == "ready", server.tail()
        yield server
    finally:
        server.stop()


def front_client(front: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url + "v1", api_key=FRONT_KEY, max_retries=0, timeout=60)


def ask(front: Server, text: str, stream: bool = False, **kw):
    return front_client(front).chat.completions.create(
        model="fake-echo", messages=[{"role": "user", "content": text}], stream=stream, **kw)


def test_a_chat_streams_through_two_servers(front):
    chunks = list(ask(front, "the sea is wide", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "the sea is wide"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].timings["ttft_s"] > 0


def test_stop_mid_stream_closes_the_upstream_stream(front, upstream):
    stream = ask(front, LONG, stream=True)
    seen = [c.choices[0].delta.content for c, _ in zip(stream, range(4))]
    stream.close()  # the person pressed Stop: the front server stops its remote generation
    assert "".join(seen).strip() == "w0 w1 w2"
    assert wait_idle(upstream)["last"]["completion_tokens"] < 200  # the upstream stopped too
    assert wait_idle(front, FRONT_KEY)["last"]["completion_tokens"] < 200


def test_upstream_killed_mid_stream_gives_an_error_and_the_first_app_stays_up(front, upstream):
    received = []
    with pytest.raises(openai.APIError) as e:
        for c in ask(front, LONG, stream=True):
            received.append(c.choices[0].delta.content or "")
            if len(received) == 4:
                upstream.kill()
    assert "".join(received).strip().startswith("w0 w1 w2")
    assert "broke mid-reply" in e.value.message and "kept" in e.value.message
    models = front_client(front).models.list()
    assert [m.id for m in models.data] == ["fake-echo"]  # still loaded: only the connection failed
    with pytest.raises(openai.InternalServerError) as e:
        ask(front, "anyone there")
    assert e.value.body["message"].startswith("Cannot reach the server at " + UPSTREAM)
    # the upstream comes back on the same address: the front answers again without a reload
    again = Server(upstream.data_dir, "--api-key", KEY, *UPSTREAM_ARGS, port=UPSTREAM_PORT).start()
    try:
        wait_for_status(again, "ready")
        assert ask(front, "back again").choices[0].message.content == "back again"
    finally:
        again.stop()
