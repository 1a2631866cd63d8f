"""The OpenAI-compatible API, driven by the official ``openai`` client against real ``moechat serve``
processes on loopback: the demo model for answers, the fake backend for slow and crashing streams."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from browser_helpers import Server

KEY = "sk-test-key"
ECHO = " ".join(f"w{i}" for i in range(40))  # the fake backend echoes it back, one word per token


def get_json(url: str, key: str | None = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for_status(server: Server, *wanted: str, key: str = KEY, timeout: float = 180) -> dict:
    """Poll /v1/models until the server's load status is one of ``wanted``."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        _, body = get_json(server.url + "v1/models", key)
        if body.get("status") in wanted:
            return body
        time.sleep(0.3)
    raise AssertionError(f"status stayed {body.get('status')!r}:\n{server.tail()}")


def start(tmp_path_factory, name: str, *args: str, port: int | None = None, key: str = KEY) -> Server:
    """``moechat serve`` once its model has loaded; the API needs ``key`` (KEY: given as --api-key)."""
    key_args = ("--api-key", KEY) if key == KEY else ()
    server = Server(tmp_path_factory.mktemp(name), *key_args, *args, port=port).start()
    try:
        body = wait_for_status(server, "ready", "failed", key=key)
        assert body["status"] == "ready", server.tail()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The demo model with a short context, so a too-long prompt is cheap to make."""
    server = start(tmp_path_factory, "api-demo", "--set", "max_context=128")
    yield server
    server.stop()


LOGIN = "alice:wonderland"


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """The fake backend: slow enough to leave mid-stream, and it kills itself after 30 tokens.
    The page needs a login and no API key is set: the API then takes the login as its key."""
    server = start(tmp_path_factory, "api-fake", "--backend", "fake", "--set", "delay_s=0.1",
                   "--set", "crash_after=30", "--auth", LOGIN, key=LOGIN)
    yield server
    server.stop()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, text: str, stream: bool = False, **kw):
    return c.chat.completions.create(model=kw.pop("model", "demo-model"),
                                     messages=[{"role": "user", "content": text}], stream=stream, **kw)


def streamed_text(stream) -> str:
    return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def wait_for_queue(server: Server, length: int, key: str = LOGIN, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while get_json(server.url + "v1/stats", key)[1]["queue_length"] != length:
        assert time.monotonic() < deadline, f"the queue never held {length} requests"
        time.sleep(0.05)


def test_models_lists_the_loaded_model_and_the_backends(demo_server):
    models = client(demo_server).models.list()
    assert [m.id for m in models.data] == ["demo-model"]
    assert models.data[0].context_length == 128
    _, raw = get_json(demo_server.url + "v1/models")
    backends = {b["name"]: b for b in raw["backends"]}
    assert backends["transformers"]["available"] and "fake" in backends
    assert client(demo_server).models.retrieve("demo-model").backend == "transformers"


def test_reply_with_usage_and_timings_streamed_or_not(demo_server):
    c = client(demo_server)
    whole = ask(c, "Hello", max_tokens=8, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.model == "demo-model" and whole.object == "chat.completion"
    u = whole.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert whole.choices[0].finish_reason == ("length" if u.completion_tokens == 8 else "stop")
    assert whole.timings["ttft_s"] > 0 and whole.timings["total_s"] >= whole.timings["ttft_s"]
    assert whole.timings["completion_tokens"] == u.completion_tokens

    chunks = list(ask(c, "Hello", stream=True, max_tokens=8, temperature=0, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert [ch.choices[0].finish_reason for ch in finish] == [whole.choices[0].finish_reason]
    assert finish[0].timings["ttft_s"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert chunks[-1].usage.prompt_tokens == u.prompt_tokens and chunks[-1].timings["decode_tok_s"] > 0
    # without include_usage there is no usage chunk
    plain = list(ask(c, "Hello", stream=True, max_tokens=3, temperature=0))
    assert all(ch.choices for ch in plain) and all(ch.usage is None for ch in plain)


def test_stop_strings_and_seeds_reach_the_backend(demo_server):
    c = client(demo_server)
    text = ask(c, "Write a short poem about the sea.", max_tokens=24, temperature=0).choices[0].message.content
    # a stop string of plain characters (a lone byte of a character decodes differently mid-stream)
    at = next(i for i in range(2, len(text) - 2)
              if text.find(text[i:i + 2]) == i and text[:i].strip() and text[i:i + 2].isalnum())
    cut = ask(c, "Write a short poem about the sea.", max_tokens=24, temperature=0, stop=[text[at:at + 2]])
    assert cut.choices[0].message.content == text[:at] and cut.choices[0].finish_reason == "stop"
    sampled = {ask(c, "Hello", max_tokens=12, temperature=1.5, seed=7).choices[0].message.content for _ in range(2)}
    greedy = ask(c, "Hello", max_tokens=12, temperature=0).choices[0].message.content
    assert len(sampled) == 1 and greedy not in sampled  # the seed repeats; the temperature samples


def test_two_concurrent_clients_get_whole_separate_answers(demo_server):
    c = client(demo_server)
    prompts = ["Hello! How are you today?", "What is the capital of France?"]
    alone = [ask(c, p, max_tokens=16, temperature=0).choices[0].message.content for p in prompts]
    assert alone[0] != alone[1]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        if i == 0:
            got[i] = streamed_text(ask(c, prompts[i], stream=True, max_tokens=16, temperature=0))
        else:
            got[i] = ask(c, prompts[i], max_tokens=16, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(0), got.get(1)] == alone


def test_errors_have_the_openai_shape_and_a_sentence(demo_server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(demo_server, key="wrong").models.list()
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    status, body = get_json(demo_server.url + "v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    c = client(demo_server)
    with pytest.raises(openai.NotFoundError) as e:
        ask(c, "Hello", model="gpt-4o")
    assert e.value.body["code"] == "model_not_found" and "demo-model" in e.value.body["message"]

    for bad, param in [(dict(temperature=3), "temperature"), (dict(n=2), "n"), (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, "Hello", **bad)
        assert e.value.body["param"] == param and e.value.body["message"].startswith("The request has bad parameters")

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, "the sea " * 100, stream=stream, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        assert "takes at most 128" in e.value.body["message"]

    req = urllib.request.Request(demo_server.url + "v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["message"] == "The request body is not valid JSON."


def test_a_page_login_is_the_api_key_when_no_key_is_set(fake_server):
    status, body = get_json(fake_server.url + "v1/models", key=None)
    assert status == 401 and "USER:PASSWORD" in body["error"]["message"]
    assert get_json(fake_server.url + "v1/models", key="alice:wrong")[0] == 401
    assert [m.id for m in client(fake_server, LOGIN).models.list().data] == ["fake-echo"]


def test_a_prompt_of_far_more_characters_than_the_context_holds_is_a_400_before_it_is_tokenized(fake_server):
    """The fake backend (context 4096) counts one token per word: by tokens this one-word prompt
    fits, by characters it cannot."""
    from moechat.backends.worker import MAX_CHARS_PER_TOKEN
    c = client(fake_server, LOGIN)
    counted = get_json(fake_server.url + "v1/stats", LOGIN)[1]["backend_stats"]["fake_prompt_chars_counted"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            reply = ask(c, "x" * (4096 * MAX_CHARS_PER_TOKEN + 1), stream=stream, model="fake-echo", max_tokens=4)
            list(reply) if stream else reply
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
        assert e.value.body["message"].startswith(f"The prompt is {4096 * MAX_CHARS_PER_TOKEN + 1:,} characters "
                                                  "but this model takes at most 4096 tokens")
    assert get_json(fake_server.url + "v1/stats", LOGIN)[1]["backend_stats"]["fake_prompt_chars_counted"] == counted


def test_leaving_mid_stream_stops_the_generation(fake_server):
    c = client(fake_server, LOGIN)
    stream = ask(c, ECHO, stream=True, model="fake-echo")
    seen = [ch.choices[0].delta.content for ch, _ in zip(stream, range(4))]
    stream.close()
    assert "".join(seen).strip() == "w0 w1 w2"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, stats = get_json(fake_server.url + "v1/stats", LOGIN)
        if stats["queue_length"] == 0 and stats["last"]:
            break
        time.sleep(0.2)
    assert stats["queue_length"] == 0 and stats["last"]["completion_tokens"] < 40
    # and the next client is served
    assert ask(c, "one two three", model="fake-echo").choices[0].message.content == "one two three"


def test_backend_crash_mid_stream_ends_the_stream_with_an_error(fake_server):
    c = client(fake_server, LOGIN)
    received = []
    queued: dict = {}

    def ask_queued():
        try:
            ask(c, "am I next?", model="fake-echo")
        except openai.APIError as exc:
            queued["error"] = exc

    behind = threading.Thread(target=ask_queued)
    with pytest.raises(openai.APIError) as e:
        for ch in ask(c, ECHO, stream=True, model="fake-echo"):
            received.append(ch.choices[0].delta.content or "" if ch.choices else "")
            if not behind.is_alive() and len(received) == 2:   # another client queues behind this one
                behind.start()
                wait_for_queue(fake_server, 2)
    assert "".join(received).strip() == " ".join(f"w{i}" for i in range(30))
    assert "killed" in e.value.message and "load the model again" in e.value.message
    assert e.value.body["code"] == "backend_crashed"
    behind.join(60)
    assert not behind.is_alive(), "the queued request hangs"
    assert queued["error"].status_code == 503 and queued["error"].body["code"] == "model_not_loaded"
    assert queued["error"].body["message"] == ("No model is loaded. The fake backend process was killed by SIGKILL. "
                                               "Your chats are kept; load the model again to continue.")
    # the server stays up and says why it cannot answer now
    with pytest.raises(openai.InternalServerError) as e:
        ask(c, "hello", model="fake-echo")
    assert e.value.status_code == 503 and e.value.body["code"] == "model_not_loaded"
    assert e.value.body["message"].startswith("No model is loaded.")
    assert c.models.list().data == []
    with urllib.request.urlopen(fake_server.url, timeout=30) as r:
        assert r.status == 200
