"""The Compare view: presets from the model panel, a comparison run in the background with its
progress and results, Cancel, past runs and export. Running a comparison loads models, so it
takes the same permission as Load (``may_manage``)."""

from __future__ import annotations

import html
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from moechat.webui import compare as cmp
from moechat.webui.chats import ChatError
from moechat.webui.handlers.context import Context, may_manage, not_allowed
from moechat.webui.handlers.loading import folder_refusal_of, page_settings

POLL_S = 0.5       # the page's view of a running comparison is redrawn this often


def preset_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(p.label(), p.name) for p in ctx.compares.presets()]


def after_choices(ctx: Context) -> list[tuple[str, str]]:
    """What to load once the comparison is over."""
    return ([("What was loaded before", cmp.AFTER_PREVIOUS), ("Nothing", cmp.AFTER_NOTHING)]
            + [(f"The preset {label}", name) for label, name in preset_choices(ctx)])


def save_preset(ctx: Context, user: str, name: str, backend: str | None, folder: str | None,
                settings: dict[str, Any]) -> str:
    """Save the model panel's backend, folder and settings as the preset ``name``."""
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    if not backend:
        return "Choose a backend in the model panel first."
    entry = ctx.manager.backends().get(backend)
    if entry is not None:   # the same folder and operator-only rules as Load
        refusal = folder_refusal_of(ctx, entry, folder)
        if refusal:
            return refusal
        settings = page_settings(ctx, backend, settings)
    if entry is not None and entry.cls.needs_model:
        settings = dict(settings, model=(folder or "").strip())
    preset = cmp.Preset((name or "").strip(), backend, dict(settings))
    try:
        cmp.check_preset_name(preset.name)
        cmp.check_settings(ctx.manager, preset)
        ctx.compares.save_preset(preset, user)
    except cmp.CompareError as exc:
        return str(exc)
    return f"Saved the preset {preset.label()}."


def delete_preset(ctx: Context, user: str, names: list[str] | None) -> str:
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    if not names:
        return "Choose the presets to delete in the list first."
    try:
        for name in names:
            ctx.compares.delete_preset(name)
    except cmp.CompareError as exc:
        return str(exc)
    return f"Deleted {', '.join(names)}."


def run_compare(ctx: Context, user: str, names: list[str] | None, prompt: str, *, chat_id: int | None = None,
                use_chat: bool = False, max_new_tokens: Any = 64, temperature: Any = 0.0,
                after: str | None = cmp.AFTER_PREVIOUS, poll_s: float = POLL_S) -> Iterator[tuple[str, cmp.CompareRun | None]]:
    """Start a comparison and yield (progress line, results so far) until it ends. The run goes
    on in its own thread and is saved when it ends, also if the page goes away."""
    if not may_manage(ctx, user):
        yield not_allowed(ctx), None
        return
    try:
        presets = [ctx.compares.preset(n) for n in names or []]
        messages = None
        if use_chat:
            if chat_id is None:
                raise cmp.CompareError("Open a chat first, or untick \u201cUse the open chat\u201d and type a prompt.")
            chat = ctx.store.get(int(chat_id), user)
            messages = ([{"role": "system", "content": chat.system_prompt}] if chat.system_prompt.strip() else []) + [
                {"role": m.role, "content": m.content} for m in chat.messages if m.role in ("user", "assistant")]
            if not any(m["role"] == "user" for m in messages):
                raise cmp.CompareError("The open chat has no message yet; type a prompt instead.")
        after_value: str | cmp.Preset = after or cmp.AFTER_PREVIOUS
        if after_value not in (cmp.AFTER_PREVIOUS, cmp.AFTER_NOTHING):
            after_value = ctx.compares.preset(str(after_value))
        runner = cmp.CompareRunner(ctx.manager, presets, prompt=prompt or "", messages=messages, user=user,
                                   sampling={"max_new_tokens": number(max_new_tokens, 64, int),
                                             "temperature": number(temperature, 0.0, float)},
                                   after=after_value)
    except (cmp.CompareError, ChatError) as exc:
        yield str(exc), None
        return
    with ctx.lock:
        if ctx.compare_runner is not None:
            yield "A comparison is already running; wait for it or press Cancel.", None
            return
        ctx.compare_runner = runner
    ctx.compares.save_run(runner.result)
    thread = threading.Thread(target=finish_in_background, args=(ctx, runner), daemon=True, name="compare")
    thread.start()
    while thread.is_alive():
        snap = runner.snapshot()
        yield progress_text(snap), snap
        thread.join(poll_s)
    final = runner.snapshot()
    yield progress_text(final), final


def number(value: Any, default: Any, kind: type) -> Any:
    """A number field's value; its default when empty. A wrong value is refused by the runner."""
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise cmp.CompareError(f"{value!r} is not a number.") from None


def finish_in_background(ctx: Context, runner: cmp.CompareRunner) -> None:
    try:
        runner.run()
    except Exception:
        logger.exception("the comparison failed")
        runner.result.status = "failed"
        runner.result.note = "The comparison stopped on an internal error; see the server log."
    finally:
        try:
            ctx.compares.save_run(runner.result)
        finally:
            with ctx.lock:
                ctx.compare_runner = None


def cancel_compare(ctx: Context, user: str) -> str:
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    with ctx.lock:
        runner = ctx.compare_runner
    if runner is None:
        return "No comparison is running."
    runner.cancel()
    return "Cancelling the comparison …"


def progress_text(run: cmp.CompareRun) -> str:
    """Which entry is loading or generating, or how the run ended."""
    total = len(run.entries)
    for i, e in enumerate(run.entries):
        if e.status in ("loading", "generating", "checking"):
            doing = {"loading": "Loading", "generating": "Generating with", "checking": "Self-checking"}[e.status]
            detail = f": {e.detail}" if e.detail else ""
            return f"Entry {i + 1} of {total}: {doing} **{e.preset}**{detail} …"
    if run.status == "running":
        return run.note or "Starting …"
    failed = sum(e.status == "failed" for e in run.entries)
    head = "Comparison cancelled." if run.status == "cancelled" else (
        "Comparison finished" + (f" ({failed} of {total} failed)." if failed else "."))
    return f"{head} {run.note}".strip()


def results_html(run: cmp.CompareRun | None) -> str:
    """The entries side by side: text (with the first difference marked), then the numbers.
    Every string from a model or a person is escaped."""
    if run is None:
        return ""
    table = cmp.rows(run)
    cards = []
    for i, e in enumerate(run.entries):
        offset = cmp.diff_offset(e)
        if offset is None:
            text = html.escape(e.text)
        else:
            text = (html.escape(e.text[:offset]) + '<mark class="first-diff" title="first difference">'
                    + (html.escape(e.text[offset:]) or "(ends here)") + "</mark>")
        rows = "".join(f"<tr><th>{html.escape(what)}</th><td>{html.escape(values[i])}</td></tr>"
                       for what, values in table if what != "status")
        error = f'<p class="compare-error">{html.escape(e.error)}</p>' if e.error else ""
        check = (f'<p class="compare-selfcheck">{html.escape(e.selfcheck.get("message", ""))}</p>'
                 if e.selfcheck else "")
        cards.append(
            f'<div class="compare-entry" data-preset="{html.escape(e.preset)}" data-status="{e.status}" '
            'style="flex:1 1 0;min-width:220px;border:1px solid #8884;border-radius:8px;padding:8px">'
            f'<h4>{html.escape(e.preset)} <small class="compare-status">{html.escape(e.status)}</small></h4>'
            f'{error}<pre class="compare-text" style="white-space:pre-wrap">{text}</pre>'
            f'<table class="compare-stats">{rows}</table>{check}</div>')
    return '<div class="compare-row" style="display:flex;gap:8px;align-items:flex-start">' + "".join(cards) + "</div>"


def run_choices(ctx: Context, user: str) -> list[tuple[str, int]]:
    return [(label, run_id) for run_id, label in ctx.compares.runs(user)]


def open_run(ctx: Context, user: str, run_id: int | None) -> cmp.CompareRun:
    if run_id is None:
        raise cmp.CompareError("Run a comparison or choose a past one first.")
    return ctx.compares.run(int(run_id), user)


def export_run(ctx: Context, user: str, run_id: int | None, fmt: str) -> str:
    """Write the comparison as Markdown (``md``) or JSON to a temporary file; its path."""
    run = open_run(ctx, user, run_id)
    text = cmp.to_markdown(run) if fmt == "md" else cmp.to_json(run)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "-vs-".join(e.preset for e in run.entries)).strip("-")[:60] or "run"
    path = Path(tempfile.mkdtemp(prefix="moechat-compare-")) / f"compare-{run.id}-{slug}.{fmt}"
    path.write_text(text, encoding="utf-8")
    return str(path)

