"""What the page's buttons do, as plain functions over the BackendManager and the ChatStore.

Nothing here imports Gradio: ``moechat.webui.app`` wires these to components. Each person is known
by a user name ("" without login) and each open page by a session id; a person's Stop or load
never touches another session's request.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from moechat.backends import machine
from moechat.backends.api import BackendError, GenerateRequest, Message, SamplingParams
from moechat.backends.manager import BackendManager, Generation, plan_refusal, settings_error
from moechat.webui.chats import ChatError, ChatStore, StoredMessage, reply_note

SAVE_EVERY_S = 0.3            # a streaming reply is written to the database at least this often
STATS_REFRESH_S = 2.0         # backend stats are asked of the worker at most this often
GiB = 1024**3
NOTHING_TO_STOP = "Nothing to stop."


@dataclass
class Context:
    """Everything the handlers share: one per server."""

    manager: BackendManager
    store: ChatStore
    users: dict[str, str] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)
    models_dir: str | None = None
    sessions: dict[str, Generation] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stats: dict[str, Any] = field(default_factory=dict)
    _stats_at: float = 0.0

    @classmethod
    def from_options(cls, manager: BackendManager, options: Any) -> Context:
        data_dir = Path(options.data_dir) if getattr(options, "data_dir", None) else manager.data_dir
        return cls(manager, ChatStore.in_data_dir(data_dir), dict(options.users or {}),
                   set(options.admins or ()), options.models_dir)


# ---- who may do what -----------------------------------------------------------------------
def may_manage(ctx: Context, user: str) -> bool:
    """Whether ``user`` may load and unload models: everyone unless admins are named."""
    return not ctx.admins or user in ctx.admins


def not_allowed(ctx: Context) -> str:
    return f"Only {', '.join(sorted(ctx.admins))} can load or unload models here; ask them to change the model."


# ---- the backend panel ---------------------------------------------------------------------
def backend_choices(manager: BackendManager) -> list[tuple[str, str]]:
    """(label, name) for every registered backend; unavailable ones carry the probe's reason."""
    out = []
    for name, entry in sorted(manager.backends().items()):
        probe = entry.probe()
        reason = probe.reason if len(probe.reason) <= 90 else probe.reason[:89].rstrip() + "…"
        label = entry.label if probe.available else f"{entry.label} (unavailable: {reason})"
        out.append((label, name))
    return out


def broken_plugins_text(manager: BackendManager) -> str:
    """Plugins that failed to load or register, with their error; empty when there are none."""
    failures = manager.plugins.failures
    if not failures:
        return ""
    lines = [f"- **{f.plugin}**: {f.error}" for f in failures]
    return "**Plugins that failed to load** (the others work; see `moechat plugins`):\n" + "\n".join(lines)


def backend_help(manager: BackendManager, name: str | None) -> str:
    entry = manager.backends().get(name or "")
    if entry is None:
        return "Choose a backend."
    probe = entry.probe()
    text = entry.cls.description or entry.label
    if not probe.available:
        text += f"\n\n**Not available here:** {probe.reason}"
    return text


def progress_text(manager: BackendManager) -> str:
    """The load state in one line, with the stage and how much is loaded."""
    s = manager.state
    if s.status == "loading":
        p = s.progress
        line = f"Loading with {s.backend}"
        if p is not None:
            line += f": {p.stage}"
            if p.total:
                pct = 100 * p.done / p.total if p.total else 0
                line += f" ({fmt_num(p.done)} of {fmt_num(p.total)} {p.unit}, {pct:.0f} %)".replace("  ", " ")
            elif p.done:
                line += f" ({fmt_num(p.done)} {p.unit} so far)".replace("  ", " ")
        return line + " …"
    if s.status == "ready":
        model = s.info.get("model_name") or (Path(s.model.path).name if s.model else "?")
        text = f"Loaded **{model}** with **{s.backend}**."
        if s.model is not None and s.model.path.rstrip("/").endswith("demo-model"):
            text += " This is the built-in demo model: its replies are noise. Give a model folder to chat for real."
        return text
    if s.status == "failed":
        return f"Nothing is loaded. {s.error}"
    return "Nothing is loaded. Choose a backend and a model folder, then press Load."


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def fmt_num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def load_steps(ctx: Context, user: str, backend: str | None, folder: str | None,
               settings: dict[str, Any], poll_s: float = 0.4, force: bool = False) -> Iterator[str]:
    """Load ``backend`` with ``settings`` (and the model ``folder``), yielding the progress
    line while it loads and a last line that says how it ended. A bad folder or settings, or a
    memory plan that does not fit (unless ``force``), are refused before anything is unloaded,
    so the loaded model stays."""
    manager = ctx.manager
    if not may_manage(ctx, user):
        yield not_allowed(ctx)
        return
    if not backend:
        yield "Choose a backend first."
        return
    if manager.state.status == "loading":
        yield "A model is already loading; wait for it or press Cancel load."
        return
    settings = dict(settings, model=(folder or "").strip())
    entry = manager.backends().get(backend)
    if entry is None:
        yield f"There is no backend named {backend!r}."
        return
    try:
        parsed = entry.cls.Settings.model_validate(settings)
    except ValidationError as exc:
        yield f"Load failed: {settings_error(exc)}"
        return
    probe = entry.probe(parsed)   # judged with these settings (another interpreter, say)
    if not probe.available:
        yield f"Load failed: the {backend} backend cannot run here: {probe.reason}"
        return
    try:
        _, _, plan = manager.plan(backend, settings)   # checks the folder and settings, unloads nothing
    except BackendError as exc:
        yield f"Load failed: {exc}"
        return
    except Exception as exc:                     # e.g. the demo model could not be created
        yield f"Load failed: {type(exc).__name__}: {exc}"
        return
    if plan is not None and not plan.fits and not force:
        yield f"Load failed: {plan_refusal(plan)}"
        return
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["info"] = manager.load(backend, settings, user=user or None, force=force)
        except BackendError as exc:
            outcome["error"] = str(exc)
        except Exception as exc:
            logger.exception("load failed")
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=run, daemon=True, name=f"load-{backend}")
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        if manager.state.status == "loading":
            yield f"{progress_text(manager)} {fmt_duration(time.monotonic() - started)}"
        else:   # the load waits its turn behind replies already being written
            yield f"Waiting for the replies being written to finish, then loading with {backend} …"
        worker.join(poll_s)
    if "error" in outcome:
        if outcome["error"].startswith("Loading was cancelled") or "Cancelled" in outcome["error"]:
            yield "Loading was cancelled; nothing is loaded."
        else:
            yield f"Load failed: {outcome['error']}"
    else:
        from moechat.backends.planning import describe
        plan = manager.state.plan
        yield (progress_text(manager) + (f"\n\nMemory plan: {describe(plan)}" if plan is not None else "")
               + "".join(f"\n\n**Warning:** {w}" for w in load_warnings(manager.state.info)))


def load_warnings(info: dict[str, Any]) -> list[str]:
    """What a finished load says the person should know: memory far from the plan, offload that
    did not happen, a backend whose output failed its self-check."""
    out = []
    if info.get("wrong_output"):
        out.append("this backend failed its output self-check: its replies are likely garbage.")
    out.extend(info.get("warnings") or [])
    if info.get("plan_check"):
        out.append(info["plan_check"])
    return out


def plan_preview(ctx: Context, backend: str | None, folder: str | None, settings: dict[str, Any]) -> str:
    """The memory plan for loading ``folder`` with ``backend`` and ``settings``, as Markdown,
    before anything is loaded; or the sentence that says why there is none."""
    if not backend:
        return "Choose a backend first."
    from moechat.backends.planning import markdown
    try:
        _, _, plan = ctx.manager.plan(backend, dict(settings, model=(folder or "").strip()))
    except BackendError as exc:
        return str(exc)
    if plan is None:
        return f"The {backend} backend gives no memory plan for this model."
    return markdown(plan)


def cancel_load(ctx: Context, user: str) -> str:
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    if ctx.manager.state.status != "loading":
        return "Nothing is loading."
    ctx.manager.cancel_load()
    return "Cancelling the load …"


def unload(ctx: Context, user: str) -> str:
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    ctx.manager.unload()
    return "Unloaded. " + progress_text(ctx.manager)


# ---- chats ---------------------------------------------------------------------------------
def display(messages: list[StoredMessage]) -> list[dict[str, str]]:
    """The chat as the chatbot shows it: each reply with its note (who wrote it, speed, cut)."""
    out = []
    for m in messages:
        if m.role == "system":
            continue
        content = m.content
        note = reply_note(m)
        if note:
            content = (content + "\n\n" if content else "") + f"<sub>{note}</sub>"
        out.append({"role": m.role, "content": content})
    return out


def chat_choices(ctx: Context, user: str, query: str = "") -> list[tuple[str, int]]:
    out = []
    for c in ctx.store.list(user, query or ""):
        when = time.strftime("%d %b %H:%M", time.localtime(c.updated))
        out.append((f"{c.title} · {when}", c.id))
    return out


def open_chat(ctx: Context, user: str, chat_id: int | None) -> tuple[list[dict], str]:
    """The chat's messages (for display) and its system prompt."""
    if chat_id is None:
        return [], ""
    chat = ctx.store.get(int(chat_id), user)
    return display(chat.messages), chat.system_prompt


def export_chat(ctx: Context, user: str, chat_id: int | None, fmt: str) -> str:
    """Write the chat as Markdown (``md``) or JSON to a temporary file and return its path."""
    if chat_id is None:
        raise ChatError("Open or start a chat first, then export it.")
    chat = ctx.store.get(int(chat_id), user)
    text = ctx.store.export_markdown(chat.id, user) if fmt == "md" else ctx.store.export_json(chat.id, user)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", chat.title).strip("-")[:40] or "chat"
    path = Path(tempfile.mkdtemp(prefix="moechat-export-")) / f"{slug}.{fmt}"
    path.write_text(text, encoding="utf-8")
    return str(path)


def import_chat(ctx: Context, user: str, path: str | None) -> int:
    if not path:
        raise ChatError("Choose a JSON file exported from moechat.")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatError(f"The file could not be read as text ({exc.__class__.__name__}).") from exc
    return ctx.store.import_json(user, text)


# ---- a turn: send, regenerate, continue, edit ------------------------------------------------
@dataclass
class TurnView:
    """One state of the page while a reply streams."""

    chat_id: int | None
    messages: list[dict[str, str]]
    notice: str = ""
    live: dict[str, Any] = field(default_factory=dict)
    accepted: bool = True     # False: the request was refused (keep the typed text)
    new_chat: bool = False    # the chat list needs refreshing


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
    if gen is None:
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

    try:
        params = sampling_from(sampling or {})
    except ValueError as exc:
        yield view(str(exc), accepted=False)
        return
    if action == "send" and not text.strip():
        yield view("Type a message first.", accepted=False)
        return
    if not manager.state.ready:
        yield view(manager.not_ready_message(), accepted=False)
        return
    with ctx.lock:
        if session in ctx.sessions:
            yield view("Your previous reply is still being written; wait for it or press Stop.", accepted=False)
            return
    new_chat = False
    try:
        if chat_id is None:
            if action != "send":
                yield view("Send a message first.", accepted=False)
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
                yield view("There is nothing to regenerate yet; send a message first.", accepted=False)
                return
            while msgs and msgs[-1].role == "assistant":
                msgs = msgs[:-1]
            store.truncate(chat_id, user, len(msgs))
        elif action == "continue":
            if not msgs or msgs[-1].role != "assistant":
                yield view("There is no reply to continue; send a message first.", accepted=False)
                return
            continue_last = True
            reply_id, base = msgs[-1].id, msgs[-1].content
        elif action == "edit":
            if index is None or not 0 <= index < len(msgs) or msgs[index].role != "user":
                yield view("Choose one of your own messages to edit (click it in the chat).", accepted=False)
                return
            if not text.strip():
                yield view("The edited message is empty; type its new text.", accepted=False)
                return
            store.update_message(msgs[index].id, content=text)
            store.truncate(chat_id, user, index + 1)
        else:
            raise ValueError(f"unknown action {action!r}")
    except ChatError as exc:
        yield view(str(exc), accepted=False)
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
    saved_at = 0.0
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
                live = {"tokens": chunks, "ttft_s": first_at - started,
                        "tok_s": (chunks - 1) / (now - first_at) if now > first_at and chunks > 1 else None}
                yield view("Writing …", live=live)
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
    yield view(notice, live=live)


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


# ---- live stats ------------------------------------------------------------------------------
def stats_snapshot(ctx: Context) -> dict[str, Any]:
    """The manager's stats, asked of the worker at most every ``STATS_REFRESH_S`` (the worker
    answers at once, also while a reply streams)."""
    now = time.monotonic()
    manager = ctx.manager
    if now - ctx._stats_at >= STATS_REFRESH_S:
        try:
            fresh = manager.stats(timeout=3)
        except Exception as exc:
            fresh = dict(ctx._stats, backend_stats_error=str(exc))
        if not (fresh.get("backend_stats") or {}).get("gpus"):
            # no GPU numbers from the backend: ask nvidia-smi, as seldom as the worker
            fresh["host_gpus"] = [{"index": g.index, "used_bytes": g.used, "total_bytes": g.total}
                                  for g in machine.gpus()]
        ctx._stats, ctx._stats_at = fresh, now
    out = dict(ctx._stats)
    # what changes without asking the worker: state, the last reply, the queue
    out["status"] = manager.state.status
    out["backend"] = manager.state.backend
    out["queue_length"] = manager.queue_length()
    if manager.history:
        out["last"] = dict(manager.history[-1])
    if manager.state.status != "ready":
        out.pop("backend_stats", None)
        out.pop("worker_pid", None)
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.0f} MiB"


def stats_markdown(ctx: Context, live: dict[str, Any] | None = None) -> str:
    """The live stats panel: speed of the reply being written (or the last one), memory, queue,
    and every extra key the backend reports."""
    s = stats_snapshot(ctx)
    rows: list[tuple[str, str]] = []
    last = s.get("last") or {}
    if live and live.get("tok_s") is not None:
        rows.append(("tok/s (this reply)", f"{live['tok_s']:.1f}"))
    elif last.get("decode_tok_s") is not None:
        rows.append(("tok/s (last reply)", f"{last['decode_tok_s']:.1f}"))
    else:
        rows.append(("tok/s", "–"))
    ttft = (live or {}).get("ttft_s", last.get("ttft_s"))
    rows.append(("time to first token", f"{ttft:.2f} s" if ttft is not None else "–"))
    if live and live.get("tokens") is not None:
        rows.append(("tokens written", str(live["tokens"])))
    elif last:
        rows.append(("tokens (last reply)", f"{last.get('prompt_tokens') or 0} prompt + {last.get('completion_tokens') or 0}"))
    bstats = dict(s.get("backend_stats") or {})
    gpus = bstats.pop("gpus", None)
    rss = bstats.pop("worker_rss_bytes", None)
    gpus = gpus or s.get("host_gpus")
    if gpus:
        for g in gpus:
            rows.append((f"GPU {g['index']} memory", f"{fmt_bytes(g['used_bytes'])} of {fmt_bytes(g['total_bytes'])}"))
    else:
        rows.append(("GPU memory", "no GPU"))
    pid = s.get("worker_pid")
    if pid:
        rss = machine.process_rss(pid) or rss
    rows.append(("worker host memory", fmt_bytes(rss) if rss else "–"))
    rows.append(("queue", str(s.get("queue_length", 0))))
    for key, value in sorted(bstats.items()):
        rows.append((key.replace("_", " "), fmt_value(key, value)))
    table = "| what | now |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return table


def fmt_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        if "rate" in key and 0 <= value <= 1:
            return f"{100 * value:.1f} %"
        return f"{value:.3g}"
    if isinstance(value, int) and key.endswith("bytes"):
        return fmt_bytes(value)
    text = str(value).replace("|", "/").replace("\n", " ")
    return text if len(text) <= 80 else text[:79] + "…"


def speed_history(ctx: Context, last: int = 20) -> list[dict[str, Any]]:
    """tok/s of the last replies, oldest first, for the chart."""
    hist = [h for h in list(ctx.manager.history) if h.get("decode_tok_s") is not None][-last:]
    return [{"reply": f"{i + 1:02d}", "tok/s": round(h["decode_tok_s"], 2), "backend": h.get("backend") or ""}
            for i, h in enumerate(hist)]
