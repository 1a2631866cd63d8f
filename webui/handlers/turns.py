"""A turn: send, regenerate, continue or edit, streamed and saved while it streams; Stop; deleting
a message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from moechat.backends.api import GenerateRequest, Message, SamplingParams
from moechat.backends.manager import Generation, settings_error
from moechat.webui.chats import ChatError
from moechat.webui.handlers.chats import display
from moechat.webui.handlers.context import Context
from moechat.webui.security import bad_text

SAVE_EVERY_S = 0.3            # a streaming reply is written to the database at least this often
# A streaming reply is redrawn at most this often: every redraw reads the chat back and sends the
# whole chat to the browser, which cannot keep up with a fast backend's tokens (and then Stop
# waits behind the redraws). The final state is always drawn.
DRAW_EVERY_S = 0.08
NOTHING_TO_STOP = "Nothing to stop."


@dataclass
class TurnView:
    """One state of the page while a reply streams."""

    chat_id: int | None
    messages: list[dict[str, str]]
    notice: str = ""
    live: dict[str, Any] = field(default_factory=dict)
    accepted: bool = True     # False: the request was refused (keep the typed text)
    new_chat: bool = False    # the chat list needs refreshing
    last: bool = False        # the turn's last state (a refusal is one too)

    def __post_init__(self) -> None:
        self.last = self.last or not self.accepted


def sampling_from(values: dict[str, Any]) -> SamplingParams:
    """Sampling settings from the form; a sentence (ValueError) when one is out of range."""
    from pydantic import ValidationError
    try:
        return SamplingParams.model_validate({k: v for k, v in values.items() if k in SamplingParams.model_fields})
    except ValidationError as exc:
        raise ValueError(settings_error(exc).replace("Some settings", "Some sampling settings")) from exc


def stop(ctx: Context, session: str) -> str:
    """Stop this session's reply at the next token. Other sessions are untouched."""
    with ctx.lock:
        gen = ctx.sessions.get(session)
    if not isinstance(gen, Generation):   # none, or a turn not yet generating
        return NOTHING_TO_STOP
    gen.stop()
    return "Stopping …"


def run_turn(ctx: Context, user: str, session: str, chat_id: int | None, action: str, *,
             text: str = "", index: int | None = None, sampling: dict[str, Any] | None = None,
             system_prompt: str = "") -> Iterator[TurnView]:
    """Do ``action`` (send | regenerate | continue | edit) on the chat and stream the reply.

    Every state is also in the database: the reply is saved while it streams, and ends marked
    with how it finished (a Stop or an error leaves it marked as cut)."""
    store, manager = ctx.store, ctx.manager

    def view(notice: str = "", **kw: Any) -> TurnView:
        msgs = display(store.get(chat_id, user).messages) if chat_id is not None else []
        return TurnView(chat_id, msgs, notice, **kw)

    reservation = object()     # this session's place, taken and checked at once (one turn at a time)

    def release() -> None:
        with ctx.lock:
            if ctx.sessions.get(session) is reservation:
                del ctx.sessions[session]

    def refused(notice: str) -> TurnView:
        """The request is refused: the session's place is free again before the person reads why."""
        release()
        return view(notice, accepted=False)

    try:
        params = sampling_from(sampling or {})
    except ValueError as exc:
        yield refused(str(exc))
        return
    if action == "send" and not text.strip():
        yield refused("Type a message first.")
        return
    problem = bad_text(text) or bad_text(system_prompt)   # checked before a chat row is made
    if problem:
        yield refused(problem)
        return
    if not manager.state.ready:
        yield refused(manager.not_ready_message())
        return
    with ctx.lock:
        busy = session in ctx.sessions
        if not busy:
            ctx.sessions[session] = reservation
    if busy:
        yield refused("Your previous reply is still being written; wait for it or press Stop.")
        return
    try:
        new_chat = False
        try:
            if chat_id is None:
                if action != "send":
                    yield refused("Send a message first.")
                    return
                chat_id = store.create(user, system_prompt=system_prompt)
                new_chat = True
            chat = store.get(chat_id, user)
            if chat.system_prompt != system_prompt:
                store.set_system_prompt(chat_id, user, system_prompt)
            msgs = chat.messages
            continue_last = False
            reply_id: int | None = None
            base = ""
            if action == "send":
                store.append(chat_id, user, "user", text)
            elif action == "regenerate":
                if not any(m.role == "user" for m in msgs):
                    yield refused("There is nothing to regenerate yet; send a message first.")
                    return
                while msgs and msgs[-1].role == "assistant":
                    msgs = msgs[:-1]
                store.truncate(chat_id, user, len(msgs))
            elif action == "continue":
                if not msgs or msgs[-1].role != "assistant":
                    yield refused("There is no reply to continue; send a message first.")
                    return
                continue_last = True
                reply_id, base = msgs[-1].id, msgs[-1].content
            elif action == "edit":
                if index is None or not 0 <= index < len(msgs) or msgs[index].role != "user":
                    yield refused("Choose one of your own messages to edit (click it in the chat).")
                    return
                if not text.strip():
                    yield refused("The edited message is empty; type its new text.")
                    return
                store.update_message(msgs[index].id, content=text)
                store.truncate(chat_id, user, index + 1)
            else:
                raise ValueError(f"unknown action {action!r}")
        except ChatError as exc:
            yield refused(str(exc))
            return

        chat = store.get(chat_id, user)
        request_messages = ([Message(role="system", content=system_prompt)] if system_prompt.strip() else []) + [
            Message(role=m.role, content=m.content) for m in chat.messages if m.role in ("user", "assistant")]
        request = GenerateRequest(messages=request_messages, sampling=params, continue_last=continue_last)
        if reply_id is None:
            reply_id = store.append(chat_id, user, "assistant", "", status="streaming")
        else:
            store.update_message(reply_id, status="streaming")

        gen = manager.generate(request, user=user or None)
        with ctx.lock:
            ctx.sessions[session] = gen
        reply = base
        finished = False
        started = time.monotonic()
        first_at: float | None = None
        chunks = 0
        saved_at = drawn_at = 0.0
        final: tuple[str, dict[str, Any]] = ("The reply ended without saying how.", {})
        try:
            yield view("Waiting for the model …", new_chat=new_chat)
            for ev in gen:
                if ev.kind == "queued":
                    ahead = ev.position
                    yield view(f"Queued: {ahead} request{'s' if ahead != 1 else ''} ahead of yours. "
                               "The model serves one person at a time.")
                    started = time.monotonic()
                elif ev.kind == "chunk":
                    now = time.monotonic()
                    if first_at is None:
                        first_at = now
                    chunks += ev.tokens
                    reply += ev.text
                    if now - saved_at >= SAVE_EVERY_S or chunks == 1:
                        store.update_message(reply_id, content=reply)
                        saved_at = now
                    if now - drawn_at >= DRAW_EVERY_S:
                        if saved_at != now:    # the view is read from the database
                            store.update_message(reply_id, content=reply)
                            saved_at = now
                        live = {"tokens": chunks, "ttft_s": first_at - started,
                                "tok_s": (chunks - 1) / (now - first_at) if now > first_at and chunks > 1 else None}
                        yield view("Writing …", live=live)
                        drawn_at = time.monotonic()
                elif ev.kind == "done":
                    # record the end, but keep iterating: the stream ends by itself right after
                    # "done", which frees this request's place in the manager's queue
                    finished = True
                    final = finish_reply(ctx, user, chat_id, reply_id, len(chat.messages), reply, ev, gen, continue_last)
        finally:
            with ctx.lock:
                if ctx.sessions.get(session) is gen:
                    del ctx.sessions[session]
            if not finished:            # the page went away mid-reply: stop, keep what was written
                gen.stop()
                try:
                    store.update_message(reply_id, content=reply, status="cancelled")
                except Exception:
                    logger.exception("could not save the cut reply")
        notice, live = final
        yield view(notice, live=live, last=True)

    finally:
        release()   # no reply started (refused, or the generator was closed early)


def finish_reply(ctx: Context, user: str, chat_id: int, reply_id: int, keep: int, reply: str, ev: Any,
                 gen: Generation, continue_last: bool) -> tuple[str, dict[str, Any]]:
    """Store how the reply ended; the notice for the person and the reply's numbers."""
    status = ev.finish_reason or "stop"
    meta = reply_meta(ev.usage, gen)
    if ev.error:
        meta["error"] = ev.error
    if not reply.strip() and status in ("error", "cancelled") and not continue_last:
        # nothing was written: drop the empty reply and say why
        ctx.store.truncate(chat_id, user, keep)
        return (ev.error or "Stopped before the reply started."), {}
    ctx.store.update_message(reply_id, content=reply, status=status, meta=meta)
    notice = ev.error or {"cancelled": "Stopped.",
                          "length": "The reply reached the token limit; press Continue for more."}.get(status, "")
    return notice, dict(meta, tokens=meta.get("completion_tokens"))


def reply_meta(usage: dict[str, Any], gen: Generation) -> dict[str, Any]:
    keep = ("prompt_tokens", "completion_tokens", "ttft_s", "decode_tok_s", "prefill_tok_s", "total_s")
    meta = {k: usage.get(k) for k in keep if usage.get(k) is not None}
    meta["backend"] = usage.get("backend") or gen.backend
    meta["model"] = usage.get("model") or gen.model
    return meta


def delete_message(ctx: Context, user: str, chat_id: int | None, index: int | None) -> str:
    if chat_id is None:
        return "There is no chat open."
    if index is None:
        return "Click a message in the chat to choose it, then press Delete message."
    ctx.store.delete_message(int(chat_id), user, int(index))
    return f"Deleted message {int(index) + 1}."
