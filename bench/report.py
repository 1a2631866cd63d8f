"""Generate BENCHMARKS.md, bench/chart.png and README.md's headline table from bench/results/.

    python bench/report.py [--results bench/results] [--out BENCHMARKS.md] [--chart bench/chart.png]
                           [--readme README.md]

Every JSON file under the results folder (bench/results/archive/ aside) is one result in the
benchmark schema (moechat.backends.benchmark, docs/benchmarks.md), read through its validator: a
file that does not fit stops the report with a sentence naming it. Results of kind "product"
(``moechat bench``) make the headline and a table per card; the chart shows their decode tok/s per
backend and VRAM budget at the model's full depth, with the physical bound of that machine drawn
in (docs/benchmarks.md has the formula). Results of kind "engine-profile"
(``bench/moe_offload_speed.py``) get a section each, newest first. The archived files get a
short history section, marked as not current.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from load_at_scale import CACHED_LOAD, CHECKPOINT, FIRST_LOAD   # the wording of a load result's notes (bench/)

from moechat.backends import benchmark
from moechat.backends.benchmark import Case, Result

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
FULL_MODEL = "synthetic:qwen3-next-80b-a3b"
ARCHIVE = "archive"
HEADLINE_START = "<!-- headline: written by bench/report.py from bench/results; do not edit by hand -->"
HEADLINE_END = "<!-- end of headline -->"

Row = tuple[Result, Case]


def load_results(folder: Path) -> list[tuple[str, Result]]:
    """(file name relative to ``folder``, Result) for every result outside the archive; raises
    BenchSchemaError for a file that does not fit the schema."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        rel = path.relative_to(folder)
        if rel.parts[0] == ARCHIVE:
            continue
        found.append((rel.as_posix(), benchmark.read(path)))
    return found


def product_rows(results: list[tuple[str, Result]]) -> list[Row]:
    return [(r, c) for _, r in results if r.run.kind == "product" for c in r.cases]


def card_of(result: Result) -> str:
    return result.run.card or f"CPU only ({result.run.machine.cpu or '?'})"


def model_base(case: Case) -> str:
    return case.model.split("?")[0]


def full_depth(case: Case, key: str) -> float | None:
    """``key`` (decode_tok_s, prefill_tok_s, ttft_s) at the model's full depth."""
    if case.extrapolated is not None:
        return getattr(case.extrapolated, key)
    return getattr(case, key).median


def fmt(v: Any, spec: str = "{:.2f}") -> str:
    if isinstance(v, (int, float)) and spec == "{:.2f}" and 0 < abs(v) < 0.1:
        return f"{v:.2g}"  # small speeds keep two significant digits
    return spec.format(v) if isinstance(v, (int, float)) else "-"


def commit_of(result: Result) -> str:
    return (result.run.commit or "?")[:8] + ("+" if result.run.dirty else "")


# ---- the headline: the product path, newest run per card, backend and budget ----------------------

def headline(results: list[tuple[str, Result]]) -> str:
    """The headline table (README and BENCHMARKS.md): for the full model, the newest product-path
    case of each card, backend and budget, at full depth, with card, commit and date."""
    newest: dict[tuple[str, str, float | None], Row] = {}
    for r, c in product_rows(results):
        if c.error is not None or model_base(c) != FULL_MODEL:
            continue
        key = (card_of(r), c.backend, c.vram_budget_gb)
        if key not in newest or r.run.date > newest[key][0].run.date:
            newest[key] = (r, c)
    if not newest:
        return (f"{HEADLINE_START}\nNo product-path results for `{FULL_MODEL}` yet: run `make bench-gpu` on a GPU "
                f"machine and commit its files.\n{HEADLINE_END}")
    lines = [HEADLINE_START,
             "| backend | card | VRAM budget | decode tok/s | prefill tok/s | first token s | measured at | commit | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (card, backend, budget), (r, c) in sorted(newest.items(), key=lambda kv: (kv[0][0], -(kv[0][2] or 0),
                                                                                  -(full_depth(kv[1][1], "decode_tok_s") or 0))):
        depth = (f"{c.layers} of {c.full_layers} layers, extrapolated" if c.extrapolated is not None
                 else f"{c.layers or '?'} layers")
        lines.append("| " + " | ".join([
            backend, card, f"{budget:g} GB" if budget else "none",
            fmt(full_depth(c, "decode_tok_s")), fmt(full_depth(c, "prefill_tok_s"), "{:.1f}"),
            fmt(full_depth(c, "ttft_s"), "{:.3f}"), depth, commit_of(r), r.run.date[:10]]) + " |")
    lines.append(HEADLINE_END)
    return "\n".join(lines)


def replace_headline(text: str, table: str, where: str) -> str:
    """``text`` with its headline block replaced by ``table``."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start:
        raise SystemExit(f"report.py: {where} has no headline block (a line {HEADLINE_START!r} and a line "
                         f"{HEADLINE_END!r}); put them where the table goes.")
    return text[:start] + table + text[end + len(HEADLINE_END):]


# ---- product results: a table per card --------------------------------------------------------------

def host_read(bandwidth: dict[str, Any]) -> tuple[float, str]:
    """The rate at which this machine's CPU reads host memory, and what it is: the measured
    streaming read (``cpu_read_gb_s``), else, for runs made before that was measured, twice the
    host copy rate (a copy reads and writes each byte). 0 when neither was measured."""
    if bandwidth.get("cpu_read_gb_s"):
        return bandwidth["cpu_read_gb_s"], "the measured host read"
    return 2 * (bandwidth.get("cpu_copy_gb_s") or 0), "twice the measured host copy rate"


def missed_pipes_gb_s(bandwidth: dict[str, Any]) -> float:
    """The rate at which a token's missed experts can reach their computation: over PCIe (the
    pinned host-to-device rate) and, at the same time, through the CPU reading them from host
    memory (``host_read``), each pipe taking the share that makes both finish together."""
    return (bandwidth.get("h2d_pinned_gb_s") or 0) + host_read(bandwidth)[0]


def physical_bound(budget_gib: float | None, bandwidth: dict[str, Any]) -> float | None:
    """Batch-1 decode bound (tok/s) for the 80 B model with int4 experts on a card of
    ``budget_gib``: resident weights and the cached share of the routed experts read from GPU
    memory, the uncached share through both pipes at once (``missed_pipes_gb_s``). None without
    the bandwidths it needs."""
    from types import SimpleNamespace

    from moechat.backends import synthetic
    from moechat.backends.machine import Gpu, Machine
    from moechat.backends.moe_offload import plan as moe_offload_plan
    from moechat.backends.shapes import shapes

    gpu_bw = bandwidth.get("gpu_copy_gb_s")
    if not gpu_bw or not host_read(bandwidth)[0] or not budget_gib:
        return None
    host_bw = missed_pipes_gb_s(bandwidth) * 1e9
    model = synthetic.model_info(FULL_MODEL)
    s = shapes(model.config)
    m = Machine([Gpu(0, "budget", int(budget_gib * GiB), 0)], 512 * GiB, 512 * GiB, 16)
    plan = moe_offload_plan.plan(model, SimpleNamespace(max_context=4096, vram_budget_gb=budget_gib), m)
    share = plan.expect["cache_slots_per_layer"] / s.num_experts
    per_token = (s.experts_per_token * s.moe_layers
                 * moe_offload_plan.expert_bytes("int4", s.hidden, s.expert_intermediate))
    resident_read = (s.resident - s.embed) * 2  # every resident weight but the embedding table
    seconds = (1 - share) * per_token / host_bw + (resident_read + share * per_token) / (gpu_bw * 1e9)
    return 1 / seconds


def bandwidth_of(rows: list[Row]) -> dict[str, Any]:
    for r, _ in sorted(rows, key=lambda rc: rc[0].run.date, reverse=True):
        bw = r.run.machine.bandwidth
        if bw.get("gpu_copy_gb_s") and bw.get("cpu_copy_gb_s"):
            return bw
    return {}


def table(rows: list[Row]) -> str:
    head = ("| backend | model | budget | decode tok/s (median, min-max) | decode at full depth | prefill tok/s "
            "| first token s | load s | peak GPU GB | peak host RSS GB | date | commit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r, c in sorted(rows, key=lambda rc: (rc[1].vram_budget_gb or 0, rc[1].backend)):
        d = c.decode_tok_s
        model = c.model
        if c.layers and c.full_layers and c.layers < c.full_layers:
            model = f"{model_base(c)}, {c.layers} of {c.full_layers} layers"
        full = (fmt(c.extrapolated.decode_tok_s) + " (extrapolated)") if c.extrapolated else fmt(d.median)
        lines.append("| " + " | ".join([
            c.backend, model, f"{c.vram_budget_gb:g} GB" if c.vram_budget_gb else "none",
            f"{fmt(d.median)} ({fmt(d.min)}-{fmt(d.max)})", full,
            fmt(c.prefill_tok_s.median, "{:.1f}"), fmt(c.ttft_s.median, "{:.3f}"), fmt(c.load_time_s, "{:.1f}"),
            fmt(c.peak_gpu_bytes / 1e9 if c.peak_gpu_bytes else None),
            fmt(c.peak_host_bytes / 1e9 if c.peak_host_bytes else None),
            r.run.date[:10], commit_of(r),
        ]) + " |")
    return "\n".join(lines)


def machine_line(rows: list[Row]) -> str:
    r = max((r for r, _ in rows), key=lambda r: r.run.date)
    m, bw = r.run.machine, r.run.machine.bandwidth
    parts = [f"CPU: {m.cpu or '?'} ({m.cpu_count or '?'} threads), "
             f"{fmt((m.host_total_bytes or 0) / 1e9, '{:.0f}')} GB RAM"]
    if r.run.driver:
        parts.append(f"driver {r.run.driver}")
    measured = [f"{label} {bw[key]} GB/s" for key, label in (
        ("cpu_copy_gb_s", "CPU copy"), ("cpu_read_gb_s", "CPU read"), ("h2d_pinned_gb_s", "host to GPU pinned"),
        ("h2d_pageable_gb_s", "pageable"), ("gpu_copy_gb_s", "GPU memory")) if bw.get(key)]
    if measured:
        parts.append("measured: " + ", ".join(measured))
    return "; ".join(parts) + "."


def chart(groups: dict[str, list[Row]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 5.5), squeeze=False)
    for ax, (card, rows) in zip(axes[0], sorted(groups.items())):
        budgets = sorted({c.vram_budget_gb or 0 for _, c in rows})
        backends = sorted({c.backend for _, c in rows})
        width = 0.8 / max(len(backends), 1)
        for j, backend in enumerate(backends):
            labelled_backend = False
            for i, b in enumerate(budgets):
                # the run closest to the full depth (measured beats extrapolated), then the latest
                found = [(r, c) for r, c in rows if c.backend == backend and (c.vram_budget_gb or 0) == b
                         and full_depth(c, "decode_tok_s")]
                if not found:
                    continue
                _, best = max(found, key=lambda rc: (rc[1].layers or 0, rc[0].run.date))
                value = full_depth(best, "decode_tok_s")
                bars = ax.bar([i - 0.4 + width * (j + 0.5)], [value], width, color=f"C{j}",
                              hatch="//" if best.extrapolated else None, edgecolor="white",
                              label=None if labelled_backend else backend)
                labelled_backend = True
                ax.bar_label(bars, labels=[f"{value:.2g}" if value < 10 else f"{value:.1f}"], fontsize=7)
        bw = bandwidth_of(rows)
        labelled = False
        for i, b in enumerate(budgets):
            bound = physical_bound(b, bw) if b else None
            if bound:
                ax.hlines(bound, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label=None if labelled else "physical bound (int4 experts, this machine)")
                ax.annotate(f"{bound:.0f}", (i + 0.45, bound), fontsize=7, va="bottom", ha="right")
                labelled = True
        ax.set_xticks(range(len(budgets)), [f"{b:g} GB budget" if b else "no budget" for b in budgets])
        ax.set_ylabel("decode tok/s, batch 1 (full depth)")
        ax.set_yscale("log")
        models = sorted({model_base(c) for _, c in rows})
        ax.set_title(f"{card}\n{', '.join(models)}; hatched: extrapolated from fewer layers", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle("moechat bench: decode speed per backend and VRAM budget (batch 1, full depth)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _failures(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    out = ["Runs that did not finish:", ""]
    for _, c in sorted(rows, key=lambda rc: (rc[1].vram_budget_gb or 0, rc[1].backend)):
        budget = f" at {c.vram_budget_gb:g} GB" if c.vram_budget_gb else ""
        out.append(f"- {c.backend}{budget} on {c.model}: {c.error}")
    return out + [""]


def load_kind(result: Result) -> str | None:
    """``first`` or ``cached`` for a result of bench/load_at_scale.py (its notes say which), else None."""
    for n in result.notes:
        if n.startswith(FIRST_LOAD):
            return "first"
        if n.startswith(CACHED_LOAD):
            return "cached"
    return None


def load_table(rows: list[Row]) -> list[str]:
    """bench/load_at_scale.py's loads: what a load costs, stage by stage, apart from decode speed
    (their few decode tokens only show that the loaded model runs)."""
    lines = ["Loads at full width (`bench/load_at_scale.py`: a checkpoint of the release layout with every width "
             "and fewer layers, loaded through `moechat bench` with the page cache dropped first; "
             "docs/moe-offload.md, \"Loading at full size\", fits them to 48 layers):", "",
             "| checkpoint | load | load s | stages, s | peak host GB | host after load GB | date | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r, c in sorted(rows, key=lambda rc: (rc[0].run.date[:10], model_base(rc[1]), rc[1].layers or 0,
                                             load_kind(rc[0]) != "first")):
        stages = "; ".join(f"{st['stage']} {st['s']:.1f}" for st in c.detail.get("load_stages") or [])
        after = c.detail.get("host_rss_after_load_bytes")
        lines.append("| " + " | ".join([
            model_base(c).rsplit("/", 1)[-1] + (f", {c.layers} of {c.full_layers} layers"
                                                 if c.layers and c.full_layers and c.layers < c.full_layers else ""),
            load_kind(r) or "?",
            fmt(c.load_time_s, "{:.1f}"), stages or "-", fmt(c.peak_host_bytes / 1e9 if c.peak_host_bytes else None),
            fmt(after / 1e9 if after else None), r.run.date[:10], commit_of(r)]) + " |")
    return lines + [""]


def render_product(rows: list[Row], chart_path: Path, out_path: Path) -> list[str]:
    groups: dict[str, list[Row]] = defaultdict(list)
    failed: dict[str, list[Row]] = defaultdict(list)
    for r, c in rows:
        (failed if c.error is not None else groups)[card_of(r)].append((r, c))
    lines: list[str] = []
    if groups:
        rel = chart_path.relative_to(out_path.parent) if chart_path.is_relative_to(out_path.parent) else chart_path
        lines += [f"![decode tok/s per backend and budget]({rel.as_posix()})", ""]
    for card in sorted(set(groups) | set(failed)):
        rs = groups.get(card, [])
        lines += [f"## {card}", ""]
        if not rs:
            lines += _failures(failed.get(card, []))
            continue
        lines += [machine_line(rs), ""]
        bw = bandwidth_of(rs)
        bounds = [(b, physical_bound(b, bw)) for b in sorted({c.vram_budget_gb for _, c in rs if c.vram_budget_gb})]
        bounds = [(b, v) for b, v in bounds if v]
        if bounds:
            lines += ["Physical bound for batch-1 decode on this machine with int4 experts, when a token's "
                      "experts are cached in proportion to the cache's share of them (uniform routing; a run "
                      "whose routing repeats itself, as a random model's greedy reply does, hits more often and "
                      "can beat it): " + "; ".join(f"{v:.0f} tok/s at {b:g} GB" for b, v in bounds) + ".", ""]
        loads = [(r, c) for r, c in rs if load_kind(r)]
        rs = [(r, c) for r, c in rs if not load_kind(r)]
        if rs:
            lines += [table(rs), ""]
        notes = sorted({c.extrapolated.note for _, c in rs if c.extrapolated})
        notes += sorted({f"{c.backend}: {n}" for _, c in rs for n in c.notes})
        notes += sorted({n for r, _ in rs for n in r.notes})
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        if loads:
            lines += load_table(loads)
            checkpoints = sorted({n for r, _ in loads for n in r.notes if n.startswith(CHECKPOINT)})
            lines += [f"- {n}" for n in checkpoints] + ([""] if checkpoints else [])
        lines += _failures(failed.get(card, []))
    return lines


# ---- engine profiles (bench/moe_offload_speed.py) ------------------------------------------------

EXPERT_BYTES = 1622016            # one int4 expert of Qwen3-Next-80B, where the run did not measure it
EMBEDDING_BYTES = 151936 * 2048 * 2   # the 80 B embedding table: resident, but one row is read per token


def token_experts(case: Case) -> int:
    """Routed expert uses per decode token (10 x 48 for the 80 B model)."""
    s = case.backend_stats
    return (s.get("top_k") or 10) * (s.get("moe_layers") or 48)


def speed_bound(case: Case, bandwidth: dict[str, Any]) -> dict[str, float] | None:
    """The physical bound of one decode token of ``case``: its missed experts' bytes (over PCIe or
    computed by the CPU, whichever the run chose) through both pipes at once
    (``missed_pipes_gb_s``), plus every byte read from GPU memory (resident weights but the
    embedding table, cached experts) at the device copy rate, one after the other (a layer's
    experts wait for its router, so the two overlap little)."""
    d = case.detail
    if not bandwidth.get("h2d_pinned_gb_s") or not bandwidth.get("gpu_copy_gb_s") or not d.get("decode_ms_per_token"):
        return None
    expert = bandwidth.get("expert_bytes", EXPERT_BYTES)
    missed = d["pcie_mb_per_token"] * 1e6 + (d.get("cpu_experts_per_token") or 0) * expert
    hbm_bytes = d["resident_gb"] * GiB - EMBEDDING_BYTES + d["decode_hit_rate"] * token_experts(case) * expert
    hbm = hbm_bytes / (bandwidth["gpu_copy_gb_s"] * 1e9)
    ms = 1000 * (missed / (missed_pipes_gb_s(bandwidth) * 1e9) + hbm)
    return {"bound_ms": ms, "bound_tok_s": 1000 / ms, "share": ms / d["decode_ms_per_token"]}


def speed_parts(case: Case, parts: dict[str, Any], bandwidth: dict[str, Any]) -> dict[str, float] | None:
    """Where a token's time goes, from the parts measured alone: the resident step, the cached
    and the missed experts at their per-expert cost, the swaps at the pinned copy rate; what is
    left of the measured time is the host's share (sampling, the cache policy, the graph launch)."""
    d = case.detail
    if not parts or not parts.get("routed_layer_all_misses_us") or not bandwidth.get("h2d_pinned_gb_s"):
        return None
    top_k = case.backend_stats.get("top_k") or 10
    hits = d["decode_hit_rate"] * token_experts(case)
    out = {"resident_ms": parts["resident_step_ms"],
           "cached_experts_ms": hits * parts["routed_layer_all_hits_us"] / top_k / 1000,
           "missed_experts_ms": d["zero_copy_experts_per_token"] * parts["routed_layer_all_misses_us"] / top_k / 1000,
           "swaps_ms": d["experts_swapped_per_token"] * bandwidth.get("expert_bytes", EXPERT_BYTES)
           / (bandwidth["h2d_pinned_gb_s"] * 1e9) * 1000}
    out["host_and_rest_ms"] = d["decode_ms_per_token"] - sum(out.values())
    return out


def render_profile(name: str, result: Result) -> list[str]:
    run, bw = result.run, result.run.machine.bandwidth
    ok = [c for c in result.cases if c.error is None]
    prompt = ok[0].prompt_tokens if ok else None
    lines = [f"### {run.card or 'CPU only'}, {run.date[:16].replace('T', ' ')} UTC, commit {commit_of(result)}", "",
             f"`{run.producer}` ({name}): {ok[0].model if ok else '?'}, random weights, int4 routed experts in "
             "host memory, batch 1, the VRAM budget enforced; the engine built by the moe-offload backend's own "
             "load. Decode: sampled at temperature 1, after warm-up tokens. Prefill: a "
             f"{fmt(prompt, '{:.0f}')}-token prompt, timed once.", ""]
    lines += [n for n in result.notes for n in (n, "")]
    if bw.get("int4_kernel_hbm_gb_s"):
        lines += [f"Machine, measured in the run: pinned host-to-device {bw['h2d_pinned_gb_s']:.1f} GB/s; the int4 "
                  f"kernel reading experts in place over PCIe {bw['int4_kernel_zero_copy_gb_s']:.1f} GB/s and from "
                  f"GPU memory {bw['int4_kernel_hbm_gb_s']:.0f} GB/s; device copy {bw['gpu_copy_gb_s']:.0f} GB/s; "
                  f"host copy {bw['cpu_copy_gb_s']:.1f} GB/s"
                  + (f", host read {bw['cpu_read_gb_s']:.1f} GB/s." if bw.get("cpu_read_gb_s") else "."), ""]
    head = ("| budget | routing | cache share | decode tok/s | ms/token | hit rate | PCIe MB/token | bound tok/s | "
            "share of bound | prefill tok/s | GPU peak GiB | host peak GiB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c in ok:
        d, b = c.detail, speed_bound(c, bw) or {}
        lines.append(
            f"| {c.vram_budget_gb:g} GB | {d.get('routing', '?')} | {fmt(d.get('cache_share'), '{:.0%}')} | "
            f"**{c.decode_tok_s.median:.1f}** | {fmt(d.get('decode_ms_per_token'), '{:.1f}')} | "
            f"{fmt(d.get('decode_hit_rate'), '{:.1%}')} | {fmt(d.get('pcie_mb_per_token'), '{:.0f}')} | "
            f"{fmt(b.get('bound_tok_s'), '{:.0f}')} | {fmt(b.get('share'), '{:.0%}')} | "
            f"{fmt(c.prefill_tok_s.median, '{:.0f}')} | "
            f"{fmt(c.peak_gpu_bytes / GiB if c.peak_gpu_bytes is not None else None, '{:.1f}')} | "
            f"{fmt(c.peak_host_bytes / GiB if c.peak_host_bytes is not None else None, '{:.1f}')} |")
    lines.append("")
    piped = [c for c in ok if c.detail.get("decode_miss_policy")]
    if piped:
        lines += ["The missed experts' two pipes per decode token (docs/moe-offload.md, \"How it works\"):", "",
                  "| budget | routing | miss policy | experts on the CPU | experts over PCIe | CPU GB/s | PCIe GB/s | "
                  "GPU's experts, hand-over to wait | GPU waits for the CPU |", "|---|---|---|---|---|---|---|---|---|"]
        for c in piped:
            d = c.detail
            split = d.get("token_split_ms") or {}
            gpu = next((v for k, v in split.items() if k.startswith("gpu experts")), None)
            wait = next((v for k, v in split.items() if k.startswith("gpu waiting")), None)
            lines.append(f"| {c.vram_budget_gb:g} GB | {d.get('routing', '?')} | {d['decode_miss_policy']} | "
                         f"{fmt(d.get('cpu_experts_per_token'), '{:.0f}')} | "
                         f"{fmt(d.get('zero_copy_experts_per_token'), '{:.0f}')} | {fmt(d.get('cpu_expert_gb_s'), '{:.1f}')} | "
                         f"{fmt(d.get('pcie_expert_gb_s'), '{:.1f}')} | {fmt(gpu, '{:.2f} ms')} | {fmt(wait, '{:.2f} ms')} |")
        lines.append("")
    for c in result.cases:
        if c.error is not None:
            lines.append(f"- did not finish: {c.name}: {c.error[:200]}")
    parts_src = next((c for c in ok if c.detail.get("parts")), None)
    if parts_src:
        pt = parts_src.detail["parts"]
        lines += [f"Parts, each replayed alone from a CUDA graph: the resident step with no routed experts "
                  f"{pt['resident_step_ms']:.2f} ms ({pt['resident_ms_per_layer'] * 1000:.0f} us per layer); one layer's "
                  f"routed experts {pt['routed_layer_all_hits_us']:.0f} us when all are cached and "
                  f"{fmt(pt.get('routed_layer_all_misses_us'), '{:.0f}')} us when all are read over PCIe. Where each "
                  "run's time per token goes, from those parts:", "",
                  "| budget | routing | resident | cached experts | missed experts | swaps | host and rest | measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in ok:
            sp = speed_parts(c, pt, bw)
            if sp:
                lines.append(f"| {c.vram_budget_gb:g} GB | {c.detail.get('routing')} | {sp['resident_ms']:.2f} ms | "
                             f"{sp['cached_experts_ms']:.2f} ms | {sp['missed_experts_ms']:.2f} ms | "
                             f"{sp['swaps_ms']:.2f} ms | {sp['host_and_rest_ms']:.2f} ms | "
                             f"{c.detail['decode_ms_per_token']:.2f} ms |")
        lines.append("")
        rp = pt.get("resident_profile")
        if rp:
            lines += [f"The resident step profiled (one eager step): {rp['kernels_per_step']} kernels, "
                      f"{rp['kernel_time_ms']:.2f} ms of GPU time, so {rp['idle_between_kernels_ms']:.2f} ms of the "
                      f"graph's {rp['graph_step_ms']:.2f} ms pass between kernels; most GPU time: " + "; ".join(
                          f"{k['name'][:50]} {k['gpu_us'] / 1000:.2f} ms ({k['calls']})" for k in rp["top"][:8]) + ".", ""]
    for c in ok:
        if c.detail.get("prefill_detail"):
            lines += render_prefill(c)
    check = result.detail.get("check") or {}
    if check.get("float32", {}).get("policies"):
        c32, c16 = check["float32"], check.get("bf16", {})
        lines += [f"Check ({c32['layers']} layers, {c32['cache_slots_per_layer']} experts a layer cached, teacher-forced, "
                  "against transformers' modules on the same weights; largest logit difference over the largest "
                  "logit, argmax agreement):", "",
                  "| miss policy | experts over PCIe | experts on the CPU | float32 | bf16 |", "|---|---|---|---|---|"]
        for policy, r32 in c32["policies"].items():
            r16 = c16.get("policies", {}).get(policy, {})
            lines.append(f"| {policy} | {r32['experts_over_pcie']} | {r32['experts_on_cpu']} | "
                         f"{max(r32['max_rel_logit_diff'], 1e-4):.0e}, {r32['argmax_agree']}/{c32['tokens']} | "
                         f"{r16.get('max_rel_logit_diff', float('nan')):.3f}, {r16.get('argmax_agree')}/{c32['tokens']} |")
        lines += ["", "float32 shows the step computes the reference's function on every pipe (the run rounds to 4 "
                  "decimals); bf16 differs by bf16 rounding on random weights, carried token to token.", ""]
    elif check.get("float32"):
        c32, c16 = check["float32"], check.get("bf16", {})
        lines += [f"Check ({c32['layers']} layers, teacher-forced, against transformers' modules on the same weights): "
                  f"float32 logits within {max(c32['max_rel_logit_diff'], 1e-4):.0e} of the largest logit "
                  "(the run rounds to 4 decimals), argmax "
                  f"{c32['argmax_agree']}/{c32['tokens']}; bf16 within {c16.get('max_rel_logit_diff', float('nan')):.2f}, "
                  f"argmax {c16.get('argmax_agree')}/{c16.get('tokens')} (bf16 rounding on random weights).", ""]
    return lines


def render_prefill(case: Case, kernels: int = 6) -> list[str]:
    """One case's prefill, several ways on the same engine, and where its time goes."""
    pd = case.detail["prefill_detail"]
    lines = [f"Prefill of {pd['tokens']} tokens at {case.vram_budget_gb:g} GB, several ways on the same engine "
             "(each timed once, after a warm-up):", "",
             "| way | s | tok/s | hit rate | PCIe GB | experts copied |", "|---|---|---|---|---|---|"]
    for w in pd["ways"]:
        lines.append(f"| {w['way']} | {w['s']:.3f} | **{w['tok_s']:.0f}** | {w['hit_rate']:.1%} | {w['h2d_gb']:.2f} | "
                     f"{w['experts_copied']} |")
    agree = pd.get("grouped_vs_torch", {})
    mods = pd.get("modules_ms", {})
    top = [k for k in pd.get("top_kernels", []) if k["self_gpu_ms"] > 0][:kernels]
    same = (f"The grouped and torch ways give the same last-token logits up to bf16 rounding (largest "
            f"difference {agree['max_rel_logit_diff']:.4f} of the largest logit, argmax "
            f"{'the same' if agree['argmax_agree'] else 'different'}). ") if agree else ""
    routing = pd.get("routing", "the model's router")       # runs before uniform rows had a profile
    lines += ["", same + f"Per module, {routing}, with a "
              "sync around each module: " + "; ".join(f"{k} {v:.0f} ms" for k, v in mods.items()) + ".",
              "", "Most GPU time, by op or kernel: " + "; ".join(
                  f"{k['name'][:60]} {k['self_gpu_ms']:.0f} ms ({k['calls']} calls)" for k in top) + ".", ""]
    return lines


# ---- archived results (written before the schema; not current) ----------------------------------

def render_policies(runs: list[dict[str, Any]], machine: dict[str, Any], projection: dict | None) -> list[str]:
    """The uniform-routing runs per miss policy: each pipe's experts and bandwidth, the token's
    split, and the projection for a desktop box."""
    rows = [(r, p) for r in runs for p in r.get("by_policy", []) if len(r.get("by_policy", [])) > 1]
    if not rows:
        return []
    lines = []
    ck = machine.get("cpu_kernel") or {}
    if ck and not ck.get("error"):
        lines += ["The CPU kernel alone (one layer's 10 experts, different experts each call): " + "; ".join(
            f"{k.removeprefix('threads_')} threads {v['gb_s']:.1f} GB/s ({v['layer_10_experts_us']:.0f} us)"
            for k, v in ck.items()) + ", against {1} of {0:.0f} GB/s.".format(*host_read(machine)), ""]
    head = ("| budget | routing | miss policy | CPU threads | decode tok/s | ms/token | experts on CPU | experts over PCIe | "
            "CPU GB/s | PCIe GB/s | GPU experts ms | GPU waits ms | CPU work ms | CPU share of misses |")
    lines += ["Per miss policy, on one engine per budget and routing (each pipe's GB/s is what it achieved inside "
              "the tokens; the times are per token, summed over layers):", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r, p in rows:
        sp = p.get("token_split_ms") or {}
        vals = list(sp.values()) + [None] * 3
        routing = "uniform" if r["routing"].startswith("uniform") else "router"
        lines.append(f"| {r['vram_budget_gb']:g} GB | {routing} | {p['miss_policy']} ({p.get('decode_miss_policy')}) | "
                     f"{p.get('cpu_threads')} | **{p['decode_tok_s']:.1f}** | {p['decode_ms_per_token']:.1f} | "
                     f"{p.get('cpu_experts_per_token', 0):.0f} | {p.get('zero_copy_experts_per_token', 0):.0f} | "
                     f"{fmt(p.get('cpu_expert_gb_s'), '{:.1f}')} | {fmt(p.get('pcie_expert_gb_s'), '{:.1f}')} | "
                     f"{fmt(vals[0], '{:.2f}')} | {fmt(vals[1], '{:.2f}')} | {fmt(vals[2], '{:.2f}')} | "
                     f"{fmt(p.get('cpu_share_of_misses_at_end'), '{:.2f}')} |")
    lines.append("")
    if projection:
        lines += [f"**{projection['label']}.** Assumptions: " + "; ".join(projection["assumptions"]) + ".", "",
                  "| box (projection) | budget | misses/token | PCIe only | CPU only | hybrid |", "|---|---|---|---|---|---|"]
        for row in projection["rows"]:
            lines.append(f"| {row['box']} | {row['vram_budget_gb']:g} GB | {row['misses_per_token']:.0f} | "
                         f"{row['pcie_tok_s']:.0f} | {row['cpu_tok_s']:.0f} | **{row['hybrid_tok_s']:.0f}** |")
        lines.append("")
    return lines



BOXES = [  # the person's box (issue 15): (label, PCIe GB/s, host memory GB/s)
    ("PCIe 4.0 x16 + DDR5 dual channel", 25.0, 70.0),
    ("PCIe 4.0 x16 + DDR4 dual channel", 25.0, 45.0),
    ("PCIe 4.0 x8 + DDR5 dual channel", 13.0, 70.0),
    ("PCIe 4.0 x8 + DDR4 dual channel", 13.0, 45.0),
]
DESKTOP_GPU_GB_S = 1000.0   # an RTX 4090-class card's memory bandwidth
MEMORY_READ_SHARE = 0.85    # of a desktop's host-memory bandwidth, what reads can reach together


def desktop_projection(group: list[Result]) -> list[str]:
    """A PROJECTION, not a measurement: decode tok/s on the person's box with uniform routing, from
    the measured efficiencies of one card's runs at one commit (one miss policy a run): the pcie
    run's time less its misses, the cpu and hybrid runs' CPU rates, the machine's bandwidths.

    The CPU pipe is a roofline: the kernel's rate as measured here (it is bound by its arithmetic
    on the lent machines: the same 69-70 GB/s on a host that reads 196 GB/s and on one that reads
    94), capped by the box's memory. PCIe reads come out of that same memory, so the two pipes
    together are capped by it too."""
    bw = next((r.run.machine.bandwidth for r in group if r.run.machine.bandwidth.get("int4_kernel_zero_copy_gb_s")), {})
    cases = [c for r in group for c in r.cases if c.error is None and str(c.detail.get("routing", "")).startswith("uniform")]
    read, read_is = host_read(bw)
    if not read or not cases:
        return []
    eff_pcie = bw["int4_kernel_zero_copy_gb_s"] / bw["h2d_pinned_gb_s"]
    b = bw.get("expert_bytes") or EXPERT_BYTES
    def threads(c: Case) -> int | None:
        return c.detail.get("cpu_threads") or bw.get("threads")   # the run's, else torch's default

    rows, rates = [], {}
    for budget in sorted({c.vram_budget_gb for c in cases}):
        pcie = next((c for c in cases if c.vram_budget_gb == budget and c.detail.get("decode_miss_policy") == "pcie"), None)
        for n in sorted({threads(c) for c in cases if c.vram_budget_gb == budget}, reverse=True):
            cpu_rate = {c.detail["decode_miss_policy"]: c.detail.get("cpu_expert_gb_s") for c in cases
                        if c.vram_budget_gb == budget and threads(c) == n and c.detail.get("decode_miss_policy") in ("cpu", "hybrid")}
            cpu_rate = {p: r for p, r in cpu_rate.items() if r}
            if not pcie or not cpu_rate:
                continue
            alone = cpu_rate.get("cpu") or cpu_rate["hybrid"]      # the CPU computing every miss
            beside = cpu_rate.get("hybrid") or cpu_rate["cpu"]     # the CPU's share of a hybrid token
            rates[budget, n] = cpu_rate
            d = pcie.detail
            misses = d["zero_copy_experts_per_token"]
            # everything but the missed experts, as the pcie run measured it, plus the resident
            # weights read at a desktop card's memory bandwidth
            rest_ms = d["decode_ms_per_token"] - 1e3 * misses * b / (bw["int4_kernel_zero_copy_gb_s"] * 1e9)
            rest_ms += 1e3 * d["resident_gb"] * GiB * (1 / (DESKTOP_GPU_GB_S * 1e9) - 1 / (bw["gpu_copy_gb_s"] * 1e9))
            for label, pcie_gb_s, ddr in BOXES:
                memory = MEMORY_READ_SHARE * ddr
                r_p = min(eff_pcie * pcie_gb_s, memory)
                r_c = min(alone, memory)
                both = min(r_p + min(beside, memory), memory)      # PCIe reads come out of the same memory
                tok = [1e3 / (rest_ms + 1e3 * misses * b / (rate * 1e9)) for rate in (r_p, r_c, max(both, r_p, r_c))]
                rows.append(f"| {label} | {budget:g} GB | {n} | {misses:.0f} | {tok[0]:.0f} | {tok[1]:.0f} | "
                            f"**{tok[2]:.0f}** |")
    if not rows:
        return []
    measured = "; ".join(f"at {g:g} GB and {n} threads " + ", ".join(f"{r:.1f} GB/s in the {p} run" for p, r in by.items())
                         for (g, n), by in rates.items())
    return [f"**PROJECTION (not measured): decode tok/s on a desktop box, uniform routing**, from the runs below "
            f"of commit {commit_of(group[0])}. Assumptions: the box's cores run the CPU kernel as fast as this "
            f"machine's did with as many threads ({measured}; {read_is} {read:.0f} GB/s: the kernel is bound by its arithmetic here, "
            "not by the memory), and no faster than the box's memory allows; the GPU's in-place reads reach the same "
            f"share of the PCIe link as here ({eff_pcie:.0%} of {bw['h2d_pinned_gb_s']:.1f} GB/s of pinned copies); "
            "PCIe reads come out of the same host memory, so each pipe alone and both together read at most "
            f"{MEMORY_READ_SHARE:.0%} of it; everything but the missed experts takes what it took in the pcie run, "
            f"plus the resident weights read at {DESKTOP_GPU_GB_S:.0f} GB/s instead of {bw['gpu_copy_gb_s']:.0f}; "
            "the card of the same budget caches the same share of the experts.", "",
            "| box (projection) | budget | CPU threads | misses/token | PCIe only | CPU only | hybrid |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def render_archive(folder: Path) -> list[str]:
    """The decode and prefill table of each archived bench/moe_offload_speed.py file, newest
    first, marked as history (the files are as the old producer wrote them, see
    bench/results/archive/README.md)."""
    found = []
    for path in sorted((folder / ARCHIVE).glob("moe_offload_speed_*.json")):
        data = json.loads(path.read_text())
        found.append((data.get("environment", {}), path.name, data.get("runs", []), data.get("note"),
                      data.get("machine") or {}, data.get("projection")))
    if not found:
        return []
    lines = ["## Archived engine runs (history, not current)", "",
             "Results written before the benchmark schema, kept as they are in `bench/results/archive/` (its README "
             "says what each file is and which were edited by hand). Engine-level runs of `bench/moe_offload_speed.py` "
             "at the full 80 B shapes with random weights; not the product path, and not regenerated since.", ""]
    for env, name, runs, note, machine, projection in sorted(found, key=lambda f: f[0].get("date_utc", ""),
                                                              reverse=True):
        lines += [f"### {env.get('gpu', '?')}, {env.get('date_utc', '?')} UTC, commit {env.get('commit', '?')} "
                  f"(archive/{name})", ""]
        if note:
            lines += [f"The file's note (written or extended by hand after the run): {note}", ""]
        lines += ["| budget | routing | decode tok/s | ms/token | hit rate | prefill tok/s |", "|---|---|---|---|---|---|"]
        for r in runs:
            if r.get("error"):
                continue
            lines.append(f"| {r['vram_budget_gb']:g} GB | {r['routing']} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_ms_per_token']:.1f} | {r['decode_hit_rate']:.1%} | {r['prefill_tok_s']:.0f} |")
        lines.append("")
        lines += render_policies([r for r in runs if not r.get("error")], machine, projection)
    return lines


# ---- the page -------------------------------------------------------------------------------------

def render(results: list[tuple[str, Result]], chart_path: Path, out_path: Path, archive: Path | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from the results in `bench/results/`; do not edit by hand.",
        "Every result is in one schema (docs/benchmarks.md). The product path, `moechat bench`, loads a backend",
        "through the BackendManager in its worker as a person does; it makes the headline, the chart and a table",
        "per card. Models named `synthetic:` have the real shapes and random weights; runs with fewer layers than",
        "the model keep every width, stand for the card by a budget scaled to the depth, and their full-depth",
        "speeds are extrapolated (time per token x full layers / layers). Budgets are GiB of GPU memory, enforced",
        "in the process.",
        "",
        "## Headline (the product path)",
        "",
        headline(results),
        "",
    ]
    rows = product_rows(results)
    if not rows:
        lines += ["No product-path results yet: run `bench/gpu_compare.sh` on a GPU machine, commit its JSON files to",
                  "`bench/results/`, then run `python bench/report.py`.", ""]
    lines += render_product(rows, chart_path, out_path)
    profiles = sorted(((n, r) for n, r in results if r.run.kind == "engine-profile"),
                      key=lambda nr: nr[1].run.date, reverse=True)
    if profiles:
        lines += ["## moe-offload engine profiles", "",
                  "`bench/moe_offload_speed.py`: the moe-offload engine measured part by part, newest first "
                  "(not the product path: no worker, no chat template).", ""]
        groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
        for _, r in profiles:
            groups[(card_of(r), commit_of(r))].append(r)
        for key in sorted(groups, key=lambda k: max(r.run.date for r in groups[k]), reverse=True):
            projected = desktop_projection(groups[key])
            if projected:
                lines += [f"### Projection for a desktop box from the {key[0]} runs of commit {key[1]}", "", *projected]
        for name, r in profiles:
            lines += render_profile(name, r)
    if archive is not None:
        lines += render_archive(archive)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate BENCHMARKS.md, the chart and README's headline from bench/results.")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--chart", default=str(ROOT / "bench" / "chart.png"))
    p.add_argument("--readme", default=None, help="also write the headline into this README "
                                                  "(default: README.md when --results is bench/results)")
    args = p.parse_args(argv)
    folder = Path(args.results)
    try:
        results = load_results(folder)
    except benchmark.BenchSchemaError as exc:
        print(f"report.py: {exc}", file=sys.stderr)
        return 1
    out, chart_path = Path(args.out), Path(args.chart)
    groups: dict[str, list[Row]] = defaultdict(list)
    for r, c in product_rows(results):
        if c.error is None:
            groups[card_of(r)].append((r, c))
    if groups:
        chart(groups, chart_path)
    out.write_text(render(results, chart_path, out, folder))
    readme = Path(args.readme) if args.readme else (ROOT / "README.md" if folder.resolve() == (ROOT / "bench" / "results").resolve() else None)
    if readme is not None:
        readme.write_text(replace_headline(readme.read_text(), headline(results), str(readme)))
    print(f"wrote {out}" + (f" and {chart_path}" if groups else "") + (f" and {readme}'s headline" if readme else "")
          + f" from {len(results)} result(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
