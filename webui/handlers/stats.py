"""Live stats: the manager's numbers (asked of the worker seldom), as a table and a speed chart."""

from __future__ import annotations

import time
from typing import Any

from moechat.backends import machine
from moechat.webui.handlers.context import Context

STATS_REFRESH_S = 2.0         # backend stats are asked of the worker at most this often
GiB = 1024**3


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
