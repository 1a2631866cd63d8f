"""The model panel: the backend list, load with progress, the memory plan, cancel and unload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from moechat.backends.api import BackendError, Cancelled
from moechat.backends.manager import BackendManager
from moechat.webui.handlers.context import Context, may_manage, not_allowed
from moechat.webui.models import folder_refusal
from moechat.backends.api import secret_fields
from moechat.webui.security import loader_settings

CANCELLING = "Cancelling the load …"
COMPARING = ("A comparison is running: it loads each of its presets in turn. Wait for it to finish, "
             "or press Cancel under Compare.")


def backend_choices(manager: BackendManager) -> list[tuple[str, str]]:
    """(label, name) for every registered backend; unavailable ones carry the probe's reason."""
    out = []
    for name, entry in sorted(manager.backends().items()):
        probe = manager.probe(entry)
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
    probe = manager.probe(entry)
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
    if ctx.compare_runner is not None:
        yield COMPARING
        return
    if manager.state.status == "loading":
        yield "A model is already loading; wait for it or press Cancel load."
        return
    entry = manager.backends().get(backend)
    if entry is not None and (refusal := folder_refusal_of(ctx, entry, folder)):
        yield f"Load failed: {refusal}"
        return
    try:   # the folder, the settings, the probe and the plan, once; unloads nothing
        checked = manager.check(backend, page_settings(ctx, backend, dict(settings, model=(folder or "").strip())))
    except BackendError as exc:
        yield f"Load failed: {exc}"
        return
    except Exception as exc:                     # e.g. the demo model could not be created
        yield f"Load failed: {type(exc).__name__}: {exc}"
        return
    if (refusal := checked.refusal(force)) is not None:
        yield f"Load failed: {refusal}"
        return
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["info"] = manager.load(backend, checked=checked, user=user or None, force=force)
        except Cancelled:
            outcome["cancelled"] = True
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
    if outcome.get("cancelled"):
        yield "Loading was cancelled; nothing is loaded."
    elif "error" in outcome:
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


def page_settings(ctx: Context, backend: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of a load or plan asked for on the page: operator-only ones from the operator
    (``moechat serve --set``) whatever the page sent, and a secret left empty kept from the
    loaded model when it is the same backend (the form never holds it)."""
    entry = ctx.manager.backends().get(backend)
    if entry is None:            # the check that follows says so
        return settings
    cls = entry.cls.Settings
    out = loader_settings(cls, settings, ctx.operator_settings)
    state = ctx.manager.state
    if state.backend == backend and state.settings:
        for name in secret_fields(cls):
            if not out.get(name) and state.settings.get(name):
                out[name] = state.settings[name]
    return out


def folder_refusal_of(ctx: Context, entry: Any, folder: str | None) -> str | None:
    """Why ``folder`` may not be loaded from the page (outside the models folders), or None."""
    if not entry.cls.needs_model or ctx.folder_roots is None:
        return None
    return folder_refusal(folder, ctx.folder_roots)


def plan_preview(ctx: Context, user: str, backend: str | None, folder: str | None, settings: dict[str, Any]) -> str:
    """The memory plan for loading ``folder`` with ``backend`` and ``settings``, as Markdown,
    before anything is loaded; or the sentence that says why there is none. Only for those who
    may load (a plan reads the folder)."""
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    if not backend:
        return "Choose a backend first."
    entry = ctx.manager.backends().get(backend)
    if entry is not None and (refusal := folder_refusal_of(ctx, entry, folder)):
        return refusal
    from moechat.backends.planning import markdown
    try:
        plan = ctx.manager.check(backend, page_settings(ctx, backend, dict(settings, model=(folder or "").strip()))).plan
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
    return CANCELLING


def unload(ctx: Context, user: str) -> str:
    if not may_manage(ctx, user):
        return not_allowed(ctx)
    if ctx.compare_runner is not None:
        return COMPARING
    ctx.manager.unload()
    return "Unloaded. " + progress_text(ctx.manager)
