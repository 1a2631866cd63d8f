"""moechat-remote: a moechat backend that sends chats to an OpenAI-compatible server.

Point moechat at a bigger machine: ``vllm serve`` with tensor parallelism on a multi-GPU box,
llama.cpp's ``llama-server``, or another ``moechat serve``. Written only against moechat's public
plugin API (``moechat.backends.api`` and ``moechat.backends.hookspecs``), as any outside author would.

The backend runs in a moechat worker process like every backend. It streams the reply over
server-sent events, closes the connection on Stop (the server sees the client leave and stops
too), and reports what it measured from the stream. See README.md.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from importlib.util import find_spec
from queue import Empty, Queue
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from moechat.backends.api import (
    Backend,
    BackendError,
    BackendSettings,
    Chunk,
    GenerateRequest,
    Probe,
    Progress,
    PromptTooLong,
)
from moechat.backends.hookspecs import hookimpl

URL_ENV = "MOECHAT_REMOTE_URL"
KEY_ENV = "MOECHAT_REMOTE_API_KEY"
ALLOWED_ENV = "MOECHAT_REMOTE_ALLOWED_URLS"
DEFAULT_URL = "http://127.0.0.1:8000/v1"
PROBE_TIMEOUT_S = 3.0
POLL_S = 0.05


def env_allowed_urls() -> list[str]:
    """The operator's allow-list from the environment: $MOECHAT_REMOTE_URL and the comma-separated
    $MOECHAT_REMOTE_ALLOWED_URLS."""
    urls = [os.environ.get(URL_ENV, "")] + os.environ.get(ALLOWED_ENV, "").split(",")
    return [u.strip() for u in urls if u.strip()]


class RemoteSettings(BackendSettings):
    model: str = Field("", description="Not used: the remote server holds the model. Leave empty.")
    allowed_urls: list[str] = Field(
        default_factory=env_allowed_urls, json_schema_extra={"operator_only": True},
        description=f"The servers moechat may send chats (and the API key) to. Operator-only: "
                    f"moechat serve --set 'allowed_urls=[\"http://gpu-box:8000/v1\"]', or ${ALLOWED_ENV} "
                    f"(comma-separated); ${URL_ENV} is always allowed. Default: those two, else only "
                    f"{DEFAULT_URL}.")
    base_url: str = Field(default_factory=lambda: os.environ.get(URL_ENV, DEFAULT_URL),
                          description="Address of the OpenAI-compatible server, e.g. http://gpu-box:8000/v1 "
                                      f"(vllm serve, llama-server, moechat serve). Default: ${URL_ENV}. It must be "
                                      "one the operator allowed.")
    api_key: SecretStr = Field(SecretStr(""), description=f"The server's API key (write-only: never shown again). "
                                                          f"Empty: ${KEY_ENV} (read where the backend runs), or no key.")
    model_name: str = Field("", description="Which of the server's models to chat with; empty: the first it lists.")
    timeout_s: float = Field(120.0, gt=0, le=3600,
                             description="Seconds to wait for the server to answer, and between two tokens.")

    @field_validator("base_url")
    @classmethod
    def allowed(cls, value: str, info: ValidationInfo) -> str:
        """base_url must be one the operator allowed: the chats and the key go only there."""
        try:
            allowed = {api_root(u) for u in (info.data.get("allowed_urls") or [DEFAULT_URL])}
            url = api_root(value)
        except BackendError as exc:
            raise ValueError(str(exc)) from None
        if url not in allowed:
            raise ValueError(f"base_url {value!r} is not one the operator allowed ({', '.join(sorted(allowed))}); "
                             f"the operator adds servers with ${ALLOWED_ENV} or moechat serve --set allowed_urls=[...].")
        return value


# ---- talking to the server --------------------------------------------------------------------

def api_root(url: str) -> str:
    """``host:8000``, ``http://host:8000`` and ``http://host:8000/v1/`` all become ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    if not url:
        raise BackendError("Set base_url to the server's address, e.g. http://gpu-box:8000/v1.")
    if any(c in url for c in "@?# ") or any(ord(c) < 32 for c in url):
        raise BackendError(f"base_url {url!r} is not a plain http(s) address like http://gpu-box:8000/v1 "
                           "(no user, query or fragment).")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"base_url {url!r} is not an http(s) address like http://gpu-box:8000/v1.")
    return url if parts.path else url + "/v1"


def headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_code(text: str) -> str | None:
    """The ``error.code`` of an OpenAI-shaped error body, if any."""
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None


def server_message(text: str) -> str:
    """The sentence out of an error body: OpenAI's ``{"error": {"message"}}`` or close to it."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "no details"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if isinstance(data.get(key), str):
                return data[key]
        if isinstance(err, str):
            return err
    return text.strip()[:300]


def status_error(url: str, status: int, body: str, api_key: str, model: str | None = None) -> BackendError:
    """One sentence for an HTTP error answer from the server."""
    msg = server_message(body)
    if status in (401, 403):
        if not api_key:
            return BackendError(f"The server at {url} needs an API key (HTTP {status}: {msg}); set api_key.")
        return BackendError(f"The server at {url} refused the API key (HTTP {status}: {msg}); "
                            "set api_key to a key it accepts.")
    if status == 404 and model is None:
        return BackendError(f"{url}/models was not found (HTTP 404): is base_url the API root, "
                            "e.g. http://gpu-box:8000/v1?")
    if status == 404:
        return BackendError(f"The server at {url} does not serve the model {model!r}: {msg}")
    if status == 400 and server_code(body) == PromptTooLong.code:  # its sentence, as our type
        return PromptTooLong(msg)
    if status == 400:  # the server's own sentence as it is
        return BackendError(msg)
    if status == 503:
        return BackendError(f"The server at {url} cannot answer now: {msg}")
    return BackendError(f"The server at {url} answered HTTP {status}: {msg}")


def transport_error(url: str, exc: Exception, timeout: float, mid_reply: bool = False) -> BackendError:
    import httpx

    if mid_reply:
        return BackendError(f"The connection to the server at {url} broke mid-reply ({type(exc).__name__}: "
                            f"{exc or 'closed'}). What was written so far is kept; check the server and send again.")
    if isinstance(exc, httpx.TimeoutException):
        return BackendError(f"The server at {url} did not answer within {timeout:g} s; check that it is up, "
                            "or raise timeout_s.")
    if isinstance(exc, httpx.ConnectError):
        return BackendError(f"Cannot reach the server at {url} ({exc}). Check that it is running and that "
                            "base_url is right.")
    return BackendError(f"Talking to the server at {url} failed: {type(exc).__name__}: {exc}")


def list_models(url: str, api_key: str, timeout: float) -> list[dict[str, Any]]:
    """GET {url}/models: the server's model cards, or a BackendError with a sentence."""
    import httpx

    try:
        r = httpx.get(f"{url}/models", headers=headers(api_key), timeout=timeout)
    except httpx.HTTPError as exc:
        raise transport_error(url, exc, timeout) from None
    if r.status_code != 200:
        raise status_error(url, r.status_code, r.text, api_key)
    try:
        data = r.json()["data"]
        assert isinstance(data, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BackendError(f"{url}/models did not answer like an OpenAI-compatible server "
                           "(no JSON list of models).") from None
    return [m for m in data if isinstance(m, dict) and m.get("id")]


def context_of(card: dict[str, Any]) -> int | None:
    """The context length a model card states: moechat's ``context_length``, vLLM's
    ``max_model_len``, llama.cpp's ``meta.n_ctx_train``."""
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    for value in (card.get("context_length"), card.get("max_model_len"), meta.get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


class ReplyStream:
    """One streamed chat completion, read in its own thread so that Stop can close it at once,
    even while the server is between two tokens."""

    def __init__(self, client: Any, url: str, body: dict[str, Any], hdrs: dict[str, str]):
        self.items: Queue[tuple[str, Any]] = Queue()
        self.response: Any = None
        self.closed = False
        threading.Thread(target=self._read, args=(client, url, body, hdrs), daemon=True,
                         name="remote-stream").start()

    def _read(self, client, url, body, hdrs) -> None:
        try:
            with client.stream("POST", url, json=body, headers=dict(hdrs, Accept="text/event-stream")) as r:
                self.response = r
                if self.closed:
                    return
                if r.status_code != 200:
                    r.read()
                    self.items.put(("status", (r.status_code, r.text)))
                    return
                for line in r.iter_lines():
                    self.items.put(("line", line))
                self.items.put(("end", None))
        except Exception as exc:  # handed to the generating thread, which words it
            self.items.put(("error", exc))

    def close(self) -> None:
        """Shut the connection down now; the server sees its client leave."""
        self.closed = True
        r = self.response
        if r is None:
            return
        stream = r.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteBackend(Backend):
    name = "remote"
    label = "Remote: an OpenAI-compatible server (vLLM, llama.cpp, another moechat)"
    description = ("Sends chats to a server on another machine, e.g. `vllm serve` with tensor parallelism on "
                   "a multi-GPU box. Nothing runs here but the connection.")
    Settings = RemoteSettings
    needs_model = False
    torch_gpu_memory = False  # nothing runs here

    @classmethod
    def probe(cls, settings=None) -> Probe:
        """httpx must be installed. When $MOECHAT_REMOTE_URL names a server, also reach it and list
        its models (the reason then says which); otherwise the server is checked at load."""
        if find_spec("httpx") is None:
            return Probe(False, "httpx is not installed: pip install httpx.")
        url = os.environ.get(URL_ENV, "").strip()
        if not url:
            return Probe(True, f"Set base_url (or ${URL_ENV}) to the server's address when loading.")
        try:
            root = api_root(url)
            models = list_models(root, os.environ.get(KEY_ENV, ""), PROBE_TIMEOUT_S)
        except BackendError as exc:
            return Probe(False, str(exc))
        names = ", ".join(m["id"] for m in models) or "no models"
        return Probe(True, f"The server at {root} serves {names}.")

    # ---- in the worker -----------------------------------------------------------------------
    def load(self, settings: RemoteSettings, progress) -> dict[str, Any]:
        import httpx

        self.url = api_root(settings.base_url)
        self.api_key = settings.api_key.get_secret_value() or os.environ.get(KEY_ENV, "")
        self.timeout = settings.timeout_s
        progress(Progress(f"Asking {self.url} for its models"))
        models = list_models(self.url, self.api_key, min(self.timeout, 30.0))
        ids = [m["id"] for m in models]
        if not ids:
            raise BackendError(f"The server at {self.url} lists no models; load one there first.")
        if settings.model_name and settings.model_name not in ids:
            raise BackendError(f"The server at {self.url} does not serve {settings.model_name!r}; "
                               f"it serves {', '.join(ids)}. Set model_name to one of them.")
        self.model = settings.model_name or ids[0]
        self.context = context_of(next(m for m in models if m["id"] == self.model))
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
        self.replies = 0
        self.server_timings: dict[str, Any] = {}
        return {"model_name": self.model, "remote_url": self.url, "remote_models": ids,
                "context_length": self.context}

    def context_length(self) -> int | None:
        return self.context

    def request_body(self, request: GenerateRequest) -> dict[str, Any]:
        if request.prompt is not None:
            raise BackendError("The remote backend sends chats; a raw prompt without messages cannot be sent.")
        if not request.messages:
            raise BackendError("The request has no messages.")
        sp = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "messages": [m.model_dump() for m in request.messages], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature, "top_p": sp.top_p,
        }
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = sp.stop
        # not in OpenAI's API: sent only when asked for (vLLM and moechat take them)
        if sp.top_k:
            body["top_k"] = sp.top_k
        if sp.repetition_penalty != 1.0:
            body["repetition_penalty"] = sp.repetition_penalty
        if request.continue_last and request.messages[-1].role == "assistant":
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def generate(self, request: GenerateRequest, should_stop) -> Iterator[Chunk]:
        stream = ReplyStream(self.client, f"{self.url}/chat/completions", self.request_body(request),
                             headers(self.api_key))
        counted, finish, usage, timings, started, whole = 0, None, {}, {}, False, False
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                if should_stop():
                    stream.close()
                    yield Chunk(finish_reason="cancelled")
                    return
                try:
                    kind, value = stream.items.get(timeout=POLL_S)
                except Empty:
                    if time.monotonic() > deadline:
                        raise BackendError(f"The server at {self.url} sent nothing for {self.timeout:g} s; "
                                           "check it, or raise timeout_s.") from None
                    continue
                deadline = time.monotonic() + self.timeout
                if kind == "status":
                    raise status_error(self.url, *value, self.api_key, self.model)
                if kind == "error":
                    raise transport_error(self.url, value, self.timeout, mid_reply=started)
                if kind == "end":
                    if finish is None:
                        raise BackendError(f"The server at {self.url} ended the reply without finishing it. "
                                           "What was written so far is kept; send again.")
                    whole = True
                    break
                data = sse_data(value)
                if data is None:
                    continue
                if data == "[DONE]":
                    whole = True
                    break
                started = True
                if data.get("error"):
                    raise BackendError(f"The server at {self.url} reported an error: "
                                       f"{server_message(json.dumps(data))}")
                usage = data.get("usage") or usage
                timings = data.get("timings") or timings
                for choice in data.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        counted += 1
                        yield Chunk(text=text, tokens=1)
                    finish = choice.get("finish_reason") or finish
        finally:
            if not whole:  # stopped or failed: hang up; a whole reply leaves the connection for the next
                stream.close()
        self.replies += 1
        self.server_timings = timings
        # The server's own count wins over one per piece of text (a piece may hold several tokens).
        extra = max(0, (usage.get("completion_tokens") or 0) - counted)
        yield Chunk(tokens=extra, prompt_tokens=usage.get("prompt_tokens"),
                    finish_reason="length" if finish == "length" else "stop")

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"remote_url": self.url, "remote_model": self.model, "remote_replies": self.replies}
        t = self.server_timings
        # what the server measured itself (moechat's "timings", llama.cpp's), without the network
        decode = t.get("decode_tok_s", t.get("predicted_per_second"))
        if decode is not None:
            out["server_decode_tok_s"] = decode
        prefill = t.get("prefill_tok_s", t.get("prompt_per_second"))
        if prefill is not None:
            out["server_prefill_tok_s"] = prefill
        return out

    def unload(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def sse_data(line: str) -> dict[str, Any] | str | None:
    """The JSON of one ``data:`` line of a server-sent event stream; ``"[DONE]"`` at the end."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return payload
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@hookimpl
def register_backends(register):
    register(RemoteBackend)
