"""The OpenAI-compatible API under ``/v1``, on the same server and the same BackendManager as the
page, so API clients and page users wait in one generation queue.

    POST /v1/chat/completions   streaming (server-sent events) or not, with usage and timings
    GET  /v1/models             the loaded model, plus which backends exist
    GET  /v1/models/{id}        one model
    GET  /v1/stats              moechat's own numbers (load facts, last generation, backend stats)

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a sentence a
person can act on. docs/openai-api.md describes all of it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from moechat.backends.api import GenerateRequest, Message, PromptTooLong, SamplingParams
from moechat.backends.manager import BackendManager, Event, Generation
from moechat.webui.security import MAX_JSON_DEPTH, Access, bad_text, json_depth

DISCONNECT_POLL_S = 0.5


class APIFailure(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param, self.retry = status, message, type, code, param, retry

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # The openai client retries 5xx answers unless told not to; only a loading model is worth it.
        headers = {"x-should-retry": "true" if self.retry else "false"}
        if self.retry:
            headers["retry-after"] = "5"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class OpenAIRoute(APIRoute):
    """Answers an ``APIFailure`` raised in a route with OpenAI's error shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except APIFailure as exc:
                return exc.response()

        return run


# ---- the request ---------------------------------------------------------------------------

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        if not isinstance(value, list):
            return value or ""
        texts = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text parts are supported, not {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """What /v1/chat/completions accepts. Unknown fields are ignored; unsupported features that
    would change the answer (n > 1, tools, logprobs, JSON mode) are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=5)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float = Field(0, ge=-2, le=2)
    frequency_penalty: float = Field(0, ge=-2, le=2)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def stop_list(cls, value):
        if value is None:
            return []
        value = [value] if isinstance(value, str) else value
        if len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in value if s]

    @field_validator("n", "logprobs", "tools", "response_format")
    @classmethod
    def supported(cls, value, info: ValidationInfo):
        """Features that would change the answer and that moechat does not have."""
        name = info.field_name
        if name == "n":
            refused = value != 1
        elif name == "response_format":
            refused = bool(value) and value.get("type", "text") != "text"
        else:
            refused = bool(value)
        if refused:
            raise ValueError(UNSUPPORTED[name])
        return value


UNSUPPORTED = {"n": "only n=1 is supported", "logprobs": "logprobs are not supported",
               "tools": "tools (function calling) are not supported",
               "response_format": "only the text response format is supported"}


def validation_failure(exc: ValidationError) -> APIFailure:
    parts, first = [], None
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        first = first or where
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return APIFailure(400, "The request has bad parameters: " + "; ".join(parts) + ".", param=first)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The request body as a ChatCompletionRequest: valid UTF-8 JSON, nested at most
    MAX_JSON_DEPTH deep, with the exact types OpenAI documents (``true`` is not a number, ``"yes"``
    not a boolean) and text that is valid Unicode; else a 400 with a sentence."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIFailure(400, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError:
        raise APIFailure(400, "The request body is not valid JSON.") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIFailure(400, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.")
    if not isinstance(body, dict):
        raise APIFailure(400, "The request body must be a JSON object with model and messages.")
    try:
        req = ChatCompletionRequest.model_validate(body, strict=True)
    except ValidationError as exc:
        raise validation_failure(exc) from None
    for i, m in enumerate(req.messages):
        problem = bad_text(m.content or "")
        if problem:
            raise APIFailure(400, f"messages.{i}.content: {problem}", param=f"messages.{i}.content")
    for s in req.stop or []:
        if bad_text(s):
            raise APIFailure(400, f"stop: {bad_text(s)}", param="stop")
    return req


def to_generate_request(req: ChatCompletionRequest) -> GenerateRequest:
    """The backend request: messages as they are (developer counts as system), sampling
    parameters mapped to moechat's; those left out keep the backend's defaults."""
    sampling: dict[str, Any] = {"stop": req.stop or []}
    max_tokens = req.max_completion_tokens or req.max_tokens
    for key, value in (("max_new_tokens", max_tokens), ("temperature", req.temperature), ("top_p", req.top_p),
                       ("top_k", req.top_k), ("repetition_penalty", req.repetition_penalty), ("seed", req.seed)):
        if value is not None:
            sampling[key] = value
    try:
        params = SamplingParams(**sampling)
    except ValidationError as exc:
        raise validation_failure(exc) from None
    messages = [Message(role="system" if m.role == "developer" else m.role, content=m.content or "")
                for m in req.messages]
    return GenerateRequest(messages=messages, sampling=params,
                           continue_last=req.continue_final_message and messages[-1].role == "assistant")


# ---- bridging the blocking generation to the event loop --------------------------------------

class EventPump:
    """Iterates a Generation (blocking) in its own thread and hands its events to the event loop.
    ``stop()`` ends the generation early; the thread drains the rest by itself."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        self.check_at = 0.0
        threading.Thread(target=self._run, daemon=True, name=f"api-{gen.id}").start()

    def _run(self) -> None:
        done = False
        try:
            # Run the iterator to its end (not just to "done"): the manager frees the queue then.
            for event in self.gen:
                done = done or event.kind == "done"
                self._put(event)
            if not done:
                self._put(Event("done", finish_reason="error", error="The generation ended without an answer."))
        except Exception as exc:
            logger.opt(exception=exc).error("generation {} failed", self.gen.id)
            self._put(Event("done", finish_reason="error", error=f"The server failed while generating: {exc}"))

    def _put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self.gen.stop()

    async def next(self, request: Request | None = None) -> Event | None:
        """The next event; None when ``request``'s client went away first (the generation is
        stopped). The client is looked at every DISCONNECT_POLL_S, also while events keep coming."""
        while True:
            if request is not None and self.loop.time() >= self.check_at:
                self.check_at = self.loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.stop()
                    return None
            try:
                event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S if request else None)
            except asyncio.TimeoutError:
                continue
            if event.kind == "done":
                self.finished = True
            return event

    def stop(self) -> None:
        if not self.finished:
            self.gen.stop()


# ---- answers -------------------------------------------------------------------------------

def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage_of(event: Event) -> dict[str, int]:
    prompt = event.usage.get("prompt_tokens") or 0
    completion = event.usage.get("completion_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timings_of(event: Event, received: float, first_token: float | None) -> dict[str, Any]:
    """What a client can show: time to first token as the server saw it (waiting in the queue
    included), the backend's prefill and decode speed, and the whole request's time."""
    u = event.usage
    return {
        "ttft_s": round(first_token - received, 4) if first_token else None,
        "queued_s": round(max(0.0, first_token - received - u["ttft_s"]), 4)
        if first_token and u.get("ttft_s") is not None else None,
        "prefill_tok_s": u.get("prefill_tok_s"),
        "decode_tok_s": u.get("decode_tok_s"),
        "prompt_tokens": u.get("prompt_tokens"),
        "completion_tokens": u.get("completion_tokens"),
        "total_s": round(time.monotonic() - received, 4),
    }


def router(manager: BackendManager, options) -> APIRouter:
    """The /v1 routes, served with the page by moechat.webui.server.build_app."""
    api = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["OpenAI-compatible API"])
    access = Access.from_options(options)   # the one rule, shared with the page
    what = ("an API key: send it as 'Authorization: Bearer KEY'" if access.api_keys
            else "your login as the API key: send 'Authorization: Bearer USER:PASSWORD'")
    started = int(time.time())

    def caller(request: Request) -> str | None:
        """The user a request's key belongs to (None for a plain API key); 401 without a good key."""
        if not access.locked:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise APIFailure(401, f"This server needs {what} (the openai client's api_key).",
                             code="invalid_api_key")
        accepted, user = access.api_caller(given)
        if not accepted:
            raise APIFailure(401, "The API key is not one this server accepts; ask its operator for a valid key.",
                             code="invalid_api_key")
        return user

    def loaded_model() -> dict[str, Any] | None:
        state = manager.state
        if not state.ready:
            return None
        context = state.info.get("context_length")
        return {"id": state.info.get("model_name") or "model", "object": "model", "created": started,
                "owned_by": "moechat", "backend": state.backend, "context_length": context,
                "max_model_len": context}

    def require_model(name: str) -> str:
        card = loaded_model()
        if card is None:
            loading = manager.state.status == "loading"
            raise APIFailure(503, manager.not_ready_message(), type="server_error",
                             code="model_loading" if loading else "model_not_loaded", retry=loading)
        if name != card["id"]:
            raise APIFailure(404, f"The model {name!r} is not loaded here; this server serves {card['id']!r} "
                                  "(see GET /v1/models).", code="model_not_found", param="model")
        return card["id"]

    def failure_of(event: Event) -> APIFailure:
        error = event.error or "The backend failed."
        if event.code == PromptTooLong.code:
            return APIFailure(400, error, code="context_length_exceeded", param="messages")
        if event.code in ("model_not_loaded", "model_loading"):
            return APIFailure(503, error, type="server_error", code=event.code, retry=event.code == "model_loading")
        if event.code == "backend_crashed" or not manager.state.ready:
            return APIFailure(500, error, type="server_error", code="backend_crashed")
        return APIFailure(500, error, type="server_error", code="backend_error")

    @api.get("/models")
    def list_models(request: Request) -> dict[str, Any]:
        caller(request)
        card = loaded_model()
        return {"object": "list", "data": [card] if card else [], "status": manager.state.status,
                "backends": manager.listing()}

    @api.get("/models/{model_id:path}")
    def get_model(model_id: str, request: Request) -> dict[str, Any]:
        caller(request)
        card = loaded_model()
        if card is None or card["id"] != model_id:
            raise APIFailure(404, f"The model {model_id!r} is not loaded here (see GET /v1/models).",
                             code="model_not_found", param="model")
        return card

    @api.get("/stats")
    def stats(request: Request) -> dict[str, Any]:
        caller(request)
        raw = manager.stats(timeout=5)
        card = loaded_model()
        return {"status": raw["status"], "backend": raw.get("backend"), "model": card["id"] if card else None,
                "queue_length": raw.get("queue_length", 0), "last": raw.get("last"),
                "backend_stats": {k: v for k, v in (raw.get("backend_stats") or {}).items() if k != "gpus"},
                "error": raw.get("error")}

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        received = time.monotonic()
        user = caller(request)
        req = parse_request(await request.body())
        model = require_model(req.model)
        pump = EventPump(manager.generate(to_generate_request(req), user=user or req.user or "api"))
        first = await pump.next(request)
        while first is not None and first.kind == "queued":
            first = await pump.next(request)
        if first is None:  # the client left while waiting
            return Response(status_code=499)
        if first.kind == "done" and first.error:
            raise failure_of(first)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(
                pump, stream_events(pump, first, reply_id, created, model, include_usage, received, failure_of))
        return await collect(pump, first, request, reply_id, created, model, received, failure_of)

    return api


class EventStreamResponse(StreamingResponse):
    """Server-sent events of one generation. However the response ends (done, the client gone,
    the server shutting down), the generation ends with it."""

    def __init__(self, pump: EventPump, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.pump = pump

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.pump.stop()


async def stream_events(pump: EventPump, event: Event, reply_id: str, created: int, model: str,
                        include_usage: bool, received: float, failure_of):
    """The server-sent events of one streamed reply."""

    def chunk(delta: dict, reason: str | None = None, **extra) -> str:
        out = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
        if include_usage:
            out.setdefault("usage", None)
        return sse(out)

    first_token = None
    yield chunk({"role": "assistant", "content": ""})
    while True:
        if event.kind == "chunk" and event.text:
            first_token = first_token or time.monotonic()
            yield chunk({"content": event.text})
        elif event.kind == "done":
            if event.error:
                yield sse(failure_of(event).body())
                return
            timings = timings_of(event, received, first_token)
            yield chunk({}, finish_reason(event.finish_reason), timings=timings)
            if include_usage:
                yield sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage_of(event), "timings": timings})
            yield "data: [DONE]\n\n"
            return
        event = await pump.next()


async def collect(pump: EventPump, event: Event, request: Request, reply_id: str, created: int, model: str,
                  received: float, failure_of) -> Response:
    """The whole reply as one chat.completion."""
    text, first_token = [], None
    while event.kind != "done":
        if event.kind == "chunk" and event.text:
            first_token = first_token or time.monotonic()
            text.append(event.text)
        event = await pump.next(request)
        if event is None:
            return Response(status_code=499)
    if event.error:
        raise failure_of(event)
    return JSONResponse({
        "id": reply_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                     "finish_reason": finish_reason(event.finish_reason), "logprobs": None}],
        "usage": usage_of(event), "timings": timings_of(event, received, first_token),
        "system_fingerprint": None,
    })
