"""Safe on a LAN: a real ``moechat serve`` on loopback, locked with an API key and logins, tried
over real HTTP by a client without the key (every Gradio endpoint the page has, and /v1), by a
logged-in non-admin, and with oversized, deep, badly typed and abandoned requests."""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from contextlib import contextmanager

import httpx
import psutil
import pytest

from browser_helpers import Server
from moechat.webui.chats import ChatStore
from moechat.webui.security import MAX_FAILURES, Throttle

KEY = "sk-lan-key"
USERS = {"alice": "wonderland", "bob": "builder"}
ECHO = " ".join(f"w{i}" for i in range(200))   # the fake backend echoes it, one word per 0.05 s


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    data = tmp_path_factory.mktemp("locked")
    users = data / "users.txt"
    users.write_text("# logins\n" + "".join(f"{u}:{p}\n" for u, p in USERS.items()))
    server = Server(data, "--backend", "fake", "--set", "delay_s=0.05", "--api-key", KEY,
                    "--auth", str(users), "--admin", "alice").start()
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = httpx.get(server.url + "v1/models", headers=bearer(KEY), timeout=10)
        if r.status_code == 200 and r.json()["status"] == "ready":
            return
        time.sleep(0.3)
    raise AssertionError(server.tail())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def logged_in(server: Server, user: str, password: str):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("login", data={"username": user, "password": password})
        assert r.status_code == 200, r.text
        yield c


def components(config: dict) -> dict[int, dict]:
    return {c["id"]: c for c in config["components"]}


def dependency_of(config: dict, elem_id: str, trigger: str = "click") -> dict:
    """The event the component with ``elem_id`` fires on ``trigger``."""
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id}
    return next(d for d in config["dependencies"] if any(t[0] in ids and t[1] == trigger for t in d["targets"]))


def defaults(config: dict, dep: dict) -> list:
    comps = components(config)
    return [comps[i].get("props", {}).get("value") for i in dep["inputs"]]


def call(client: httpx.Client, dep: dict, data: list) -> dict:
    """Run one page event through Gradio's queue, as the browser does; its last message."""
    session = uuid.uuid4().hex
    r = client.post("gradio_api/queue/join", json={"fn_index": dep["id"], "data": data, "session_hash": session,
                                                   "event_data": None, "trigger_id": dep["targets"][0][0]})
    assert r.status_code == 200, r.text
    last: dict = {}
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
                if last.get("msg") == "process_completed":
                    return last
    raise AssertionError(f"no result: {last}")


def worker_of(server: Server) -> psutil.Process:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return next(p for p in children if "moechat.backends.worker" in " ".join(p.cmdline()))


def test_without_the_key_no_page_endpoint_and_no_api_route_answers(locked):
    with logged_in(locked, "bob", USERS["bob"]) as bob:
        config = bob.get("config").json()
        info = bob.get("gradio_api/info").json()
        # the control: a logged-in person's event runs (so the refusals below are about the key)
        chats = dependency_of(config, "search", "change")
        assert call(bob, chats, [""])["success"]
    deps = config["dependencies"]
    assert len(deps) > 20 and info["named_endpoints"]
    anon = httpx.Client(base_url=locked.url, timeout=30)
    refused = []
    for dep in deps:
        body = {"fn_index": dep["id"], "data": defaults(config, dep), "session_hash": "outsider",
                "event_data": None, "trigger_id": None}
        refused.append(anon.post("gradio_api/queue/join", json=body).status_code)
        if dep.get("api_name"):
            for route in ("run", "call", "api"):
                refused.append(anon.post(f"gradio_api/{route}/{dep['api_name']}",
                                         json={"data": defaults(config, dep)}).status_code)
    for name in info["named_endpoints"]:
        refused.append(anon.post(f"gradio_api/call{name}", json={"data": []}).status_code)
    for path in ("config", "gradio_api/info", "gradio_api/openapi.json", "gradio_api/queue/data?session_hash=outsider",
                 "gradio_api/heartbeat/outsider", "gradio_api/startup-events", "gradio_api/file=/etc/passwd",
                 "monitoring", "user", "token", "v1/models", "v1/stats", "v1/models/fake-echo"):
        refused.append(anon.get(path).status_code)
    refused.append(anon.post("gradio_api/upload", files={"files": ("x.json", b"[]")}).status_code)
    refused.append(anon.post("gradio_api/reset", json={"session_hash": "outsider", "event_id": "x"}).status_code)
    refused.append(anon.post("gradio_api/cancel", json={"session_hash": "outsider", "event_id": "x", "fn_index": 0}).status_code)
    refused.append(anon.post("v1/chat/completions", json={"model": "fake-echo",
                                                         "messages": [{"role": "user", "content": "hi"}]}).status_code)
    assert set(refused) == {401}, refused
    # and nothing happened: still loaded, nobody's chats made or read
    assert httpx.get(locked.url + "v1/models", headers=bearer(KEY)).json()["data"][0]["id"] == "fake-echo"


def test_the_page_takes_a_login_or_the_api_key_and_only_admins_load_unload_or_plan(locked):
    wrong = httpx.post(locked.url + "login", data={"username": "alice", "password": KEY})
    assert wrong.status_code == 400   # a login's name needs its own password, not the key
    with logged_in(locked, "carol", KEY) as carol, logged_in(locked, "bob", USERS["bob"]) as bob:
        config = carol.get("config").json()
        assert config["username"] == "carol"
        for client in (carol, bob):
            for elem in ("unload", "check-plan", "load", "cancel-load"):
                dep = dependency_of(config, elem)
                out = call(client, dep, defaults(config, dep))["output"]["data"]
                assert any("Only alice can load" in str(v) for v in out), (elem, out)
    assert httpx.get(locked.url + "v1/models", headers=bearer(KEY)).json()["status"] == "ready"


def test_import_takes_an_upload_only_never_a_server_path(locked, tmp_path):
    export = tmp_path / "chat.json"
    export.write_text(json.dumps({"title": "planted", "messages": [{"role": "user", "content": "from disk"}]}))
    with logged_in(locked, "bob", USERS["bob"]) as bob:
        config = bob.get("config").json()
        dep = dependency_of(config, "import", "upload")
        answers = []
        for path in (export, tmp_path / "missing.json"):
            data = defaults(config, dep)
            data[0] = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
            out = call(bob, dep, data)
            assert not out["success"]
            answers.append(str(out["output"]).replace(str(path), "PATH"))
    assert answers[0] == answers[1]   # the answer does not tell whether the path exists
    store = ChatStore.in_data_dir(locked.data_dir)
    assert not [c for c in store.list("bob", "") if c.title == "planted"]


def raw_post(server: Server, headers: list[str], body: bytes, chunked: bool = False) -> tuple[str, float]:
    """POST /v1/chat/completions over a plain socket, sending ``body`` piece by piece until the
    answer comes; its status line and the seconds it took."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
                "Content-Type: application/json", *headers]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        started = time.monotonic()
        for at in range(0, len(body), 65536):
            if select.select([s], [], [], 0)[0]:
                break                               # the server answered before the body was sent
            piece = body[at:at + 65536]
            try:
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except OSError:                          # the server closed the connection after answering
                break
        answer = b""
        while b"\r\n" not in answer:
            got = s.recv(4096)
            if not got:
                break
            answer += got
        return answer.split(b"\r\n")[0].decode(), time.monotonic() - started


def test_a_20_mb_body_gets_413_before_it_is_read_and_the_worker_never_sees_it(locked):
    worker = worker_of(locked)
    before = worker.memory_info().rss
    last_before = httpx.get(locked.url + "v1/stats", headers=bearer(KEY)).json()["last"]
    prompt = json.dumps({"model": "fake-echo", "messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    status, took = raw_post(locked, [f"Content-Length: {len(prompt)}"], prompt)
    assert status.split()[1] == "413" and took < 5
    # without a Content-Length the body is counted as it arrives
    status, _ = raw_post(locked, ["Transfer-Encoding: chunked"], prompt, chunked=True)
    assert status.split()[1] == "413"
    r = httpx.post(locked.url + "v1/chat/completions", headers=dict(bearer(KEY), **{"content-type": "application/json"}),
                   content=b"{" + b" " * 9_000_000 + b"}")
    assert r.status_code == 413 and "--max-request-mb" in r.json()["error"]["message"]
    assert httpx.get(locked.url + "v1/stats", headers=bearer(KEY)).json()["last"] == last_before
    assert abs(worker.memory_info().rss - before) < 20 * 2**20


@pytest.mark.parametrize("body, where", [
    ("[" * 5000 + "]" * 5000, "deeper than 32 levels"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "hi", "x": ' + "[" * 40 + "]" * 40 + "}]}",
     "deeper than 32 levels"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', "seed"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone UTF-16 surrogate"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    ('{"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}], "temperature": "1"}', "temperature"),
])
def test_bad_json_numbers_and_text_get_an_openai_400(locked, body, where):
    r = httpx.post(locked.url + "v1/chat/completions", content=body.encode(),
                   headers=dict(bearer(KEY), **{"content-type": "application/json"}), timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and where in error["message"]


def test_a_non_streamed_client_that_leaves_frees_the_queue(locked):
    body = {"model": "fake-echo", "messages": [{"role": "user", "content": ECHO}]}
    with pytest.raises(httpx.ReadTimeout):   # 200 words take 10 s; the client waits 1 s
        httpx.post(locked.url + "v1/chat/completions", json=body, headers=bearer(KEY), timeout=1.0)
    left = time.monotonic()
    while True:
        stats = httpx.get(locked.url + "v1/stats", headers=bearer(KEY)).json()
        if stats["queue_length"] == 0:
            break
        assert time.monotonic() - left < 8, "the generation went on after its client left"
        time.sleep(0.1)
    assert stats["last"]["completion_tokens"] < 200
    # the next client is served at once
    r = httpx.post(locked.url + "v1/chat/completions", headers=bearer(KEY), timeout=30,
                   json={"model": "fake-echo", "messages": [{"role": "user", "content": "one two"}]})
    assert r.json()["choices"][0]["message"]["content"] == "one two"


def test_guessing_keys_and_logins_is_throttled_per_address(locked):
    """Last in this module: it locks 127.0.0.1 out of the server for a minute. Earlier tests'
    wrong keys count too, so the guesses go on until the first 429."""
    codes = [httpx.get(locked.url + "v1/models", headers=bearer(f"guess-{i}")).status_code for i in range(11)]
    wrong = codes.index(429)
    assert set(codes[:wrong]) == {401} and set(codes[wrong:]) == {429} and wrong <= MAX_FAILURES
    right = httpx.get(locked.url + "v1/models", headers=bearer(KEY))   # while throttled, even the right key waits
    assert right.status_code == 429 and int(right.headers["retry-after"]) > 0
    assert "Too many wrong keys" in right.json()["error"]["message"]
    login = httpx.post(locked.url + "login", data={"username": "alice", "password": USERS["alice"]})
    assert login.status_code == 429 and "Too many wrong logins" in login.json()["detail"]


@pytest.mark.parametrize("args, sentence", [
    (["--api-key", "{empty}"], "holds no keys"),
    (["--api-key", "{missing}"], "no such file"),
    (["--api-key", "./keys.txt"], "no such file"),
    (["--auth", "{empty}"], "holds no USER:PASSWORD lines"),
    (["--auth", "{missing}"], "no such file"),
    (["--admin", "alice"], "--admin needs --auth"),
    (["--auth", "bob:builder", "--admin", "alice"], "alice, who is not in --auth"),
    (["--max-request-mb", "0"], "--max-request-mb must be more than 0"),
])
def test_options_that_would_fail_open_are_refused_at_start(tmp_path, capsys, args, sentence):
    from moechat.webui.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    args = [a.format(empty=empty, missing=tmp_path / "nope" / "keys") for a in args]
    assert main(["serve", "--no-load", "--data-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moechat: ") and sentence in err


def test_a_lan_address_without_key_or_login_is_warned_about():
    from moechat.webui.security import open_lan_warning
    from moechat.webui.server import ServeOptions

    warning = open_lan_warning(ServeOptions(host="0.0.0.0"))
    assert "anyone who can reach this machine can read every chat" in warning and "--api-key" in warning
    assert open_lan_warning(ServeOptions(host="127.0.0.1")) is None
    assert open_lan_warning(ServeOptions(host="::1")) is None
    assert open_lan_warning(ServeOptions(host="0.0.0.0", api_keys={KEY})) is None
    assert open_lan_warning(ServeOptions(host="192.168.1.5", users={"a": "b"})) is None


def test_wrong_logins_from_one_address_do_not_lock_out_another():
    throttle = Throttle(max_failures=3, window_s=60)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert 59 < throttle.retry_after("10.0.0.1") <= 60
    assert throttle.retry_after("10.0.0.2") == 0
