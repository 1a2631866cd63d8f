"""Generate BENCHMARKS.md and bench/chart.png from the runs in bench/results/*.json.

    python bench/report.py [--results bench/results] [--out BENCHMARKS.md] [--chart bench/chart.png]

Each JSON file is one ``moechat bench --json`` run (a list of runs is read too). Runs are grouped
by card; for each card the chart shows decode tok/s per backend and VRAM budget (extrapolated
to the full depth when a run used fewer layers) with the physical bound of that machine drawn
in: the fastest batch-1 decode the measured bandwidths allow when the int4 routed experts that
do not fit in the budget are read from host RAM (or over PCIe, whichever is faster) and the
rest from GPU memory. See docs/benchmarks.md for the formula.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024**3
FULL_MODEL = "synthetic:qwen3-next-80b-a3b"


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """Every run in ``folder``: ``moechat bench`` JSON files (one run or a list), and the
    engine-level files of bench/moe_offload_gpu.py, converted to the same fields."""
    runs = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            print(f"skipping {path}: not JSON", file=sys.stderr)
            continue
        if isinstance(data, dict) and data.get("benchmark") == "bench/moe_offload_gpu.py":
            found = from_moe_offload_gpu(data, path.name)
        else:
            found = [r for r in (data if isinstance(data, list) else [data])
                     if isinstance(r, dict) and r.get("schema") and r.get("backend")]
        for run in found:
            run["_file"] = str(path.relative_to(folder))
            runs.append(run)
    return runs


def _one(value: float | None) -> dict[str, Any]:
    return {"median": value, "min": value, "max": value, "values": [] if value is None else [value]}


def from_moe_offload_gpu(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Runs of bench/moe_offload_gpu.py (the moe-offload engine driven directly, and its
    transformers-bnb4 baseline from a random checkpoint) in ``moechat bench``'s fields. Runs at
    reduced depth had their budget scaled from 24 GB; they are listed under that card size."""
    env = data.get("environment") or {}
    machine = {"gpus": [{"name": data.get("card") or env.get("gpu", "?"),
                         "total_bytes": int((env.get("gpu_total_gb") or 0) * GiB)}],
               "cpu": env.get("cpu", f"{env.get('cpu_count', '?')} cores"), "cpu_count": env.get("cpu_count"),
               "host_total_bytes": int((env.get("host_ram_gb") or 0) * GiB), "bandwidth": {}}
    base = {"schema": "moe_offload_gpu", "date": str(data.get("date_utc") or env.get("date_utc", "")),
            "git_commit": data.get("commit") or env.get("commit"), "git_dirty": False, "machine": machine,
            "full_layers": 48, "ttft_s": _one(None), "load_time_s": None, "plan_check": None,
            "source": f"bench/moe_offload_gpu.py ({name})"}
    labels = {"moe_offload_48_layers": "moe-offload (engine)",
              "moe_offload_48_layers_uniform_routing": "moe-offload (engine, uniform routing)"}
    out = []
    for key, section in data.items():
        if not isinstance(section, dict) or not key.startswith(("moe_offload_", "transformers_bnb4_")):
            continue
        layers = section.get("layers") or 48
        if key.startswith("transformers_bnb4_"):
            runs = [dict(section, vram_budget_gb=section.get("gpu_memory_gb"))] if "decode_tok_s" in section else []
            backend = "transformers-bnb4 (random checkpoint)"
        else:
            runs = section.get("runs") or []
            backend = labels.get(key, "moe-offload (engine" + (", without fla" if "without_fla" in key else "") + ")")
        for r in runs:
            applied = r.get("vram_budget_gb")
            budget = applied if layers == 48 else 24.0  # reduced-depth runs: scaled from 24 GB
            dec, pre = r.get("decode_tok_s"), r.get("prefill_tok_s")
            model = FULL_MODEL if layers == 48 else f"{FULL_MODEL}?layers={layers}"
            run = dict(base, backend=backend, model=model, layers=layers,
                       vram_budget_gb=budget, vram_budget_applied_gb=applied, decode_tok_s=_one(dec),
                       prefill_tok_s=_one(pre),
                       peak_gpu_bytes=int(r["gpu_peak_allocated_gb"] * GiB) if r.get("gpu_peak_allocated_gb") else None,
                       peak_host_bytes=int((r.get("host_peak_gb") or section.get("host_peak_gb") or 0) * GiB) or None,
                       backend_stats={k: r[k] for k in ("cache_share", "decode_hit_rate", "pcie_mb_per_token")
                                      if k in r},
                       extrapolated=None)
            if layers < 48:
                run["extrapolated"] = {
                    "layers": 48, "decode_tok_s": dec * layers / 48 if dec else None,
                    "prefill_tok_s": pre * layers / 48 if pre else None, "ttft_s": None,
                    "note": (f"Measured with {layers} of 48 layers at full width and a budget of {applied} GB "
                             f"(24 GB scaled to the depth); time per token scaled by 48/{layers}.")}
            out.append(run)
    return out


def card_of(run: dict[str, Any]) -> str:
    gpus = run.get("machine", {}).get("gpus") or []
    return gpus[0]["name"] if gpus else f"CPU only ({run.get('machine', {}).get('cpu', '?')})"


def decode_full_depth(run: dict[str, Any]) -> float | None:
    ext = run.get("extrapolated")
    if ext and ext.get("decode_tok_s"):
        return ext["decode_tok_s"]
    return (run.get("decode_tok_s") or {}).get("median")


# For runs that did not measure the machine (bench/moe_offload_gpu.py): the lent H200 machine as
# measured on 2026-11-27 (docs/facts.md: pinned host-to-device 54.7 GB/s, CPU copy 50 GB/s) and the card's rated
# memory bandwidth. Shown as such in the report.
KNOWN_BANDWIDTH = {
    "NVIDIA H200": {"gpu_copy_gb_s": 4800.0, "cpu_copy_gb_s": 50.0, "h2d_pinned_gb_s": 54.7,
                    "source": "measurements of the lent H200 machine (docs/facts.md) and the H200's rated 4.8 TB/s"},
}


def bandwidth_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    for r in reversed(runs):
        bw = r.get("machine", {}).get("bandwidth") or {}
        if bw.get("gpu_copy_gb_s") and bw.get("cpu_copy_gb_s"):
            return bw
    return KNOWN_BANDWIDTH.get(card_of(runs[-1]), {}) if runs else {}


def physical_bound(budget_gib: float | None, bandwidth: dict[str, Any]) -> float | None:
    """Batch-1 decode bound (tok/s) for the 80 B model with int4 experts on a card of
    ``budget_gib``: resident weights and the cached share of the routed experts read from GPU
    memory, the uncached share from host RAM (CPU reads at about twice the copy rate) or over
    PCIe, whichever is faster. None without the bandwidths it needs."""
    from types import SimpleNamespace

    from moechat.backends import synthetic
    from moechat.backends.machine import Gpu, Machine
    from moechat.backends.moe_offload import plan as moe_offload_plan
    from moechat.backends.shapes import shapes

    gpu_bw = bandwidth.get("gpu_copy_gb_s")
    cpu_bw = bandwidth.get("cpu_copy_gb_s")
    if not gpu_bw or not cpu_bw or not budget_gib:
        return None
    host_bw = max(2 * cpu_bw, bandwidth.get("h2d_pinned_gb_s") or 0) * 1e9
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


def fmt(v: Any, spec: str = "{:.2f}") -> str:
    if isinstance(v, (int, float)) and spec == "{:.2f}" and 0 < abs(v) < 0.1:
        return f"{v:.2g}"  # small speeds keep two significant digits
    return spec.format(v) if isinstance(v, (int, float)) else "-"


def table(runs: list[dict[str, Any]]) -> str:
    head = ("| backend | model | budget | decode tok/s (median, min-max) | decode at full depth | prefill tok/s "
            "| first token s | load s | peak GPU GB | peak worker RSS GB | date | commit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(runs, key=lambda r: (r.get("vram_budget_gb") or 0, r["backend"])):
        d = r.get("decode_tok_s") or {}
        model = r.get("model", "")
        if r.get("layers") and r.get("full_layers") and r["layers"] < r["full_layers"]:
            model = f"{model.split('?')[0]}, {r['layers']} of {r['full_layers']} layers"
        ext = r.get("extrapolated")
        full = fmt(ext.get("decode_tok_s")) + " (extrapolated)" if ext else fmt(d.get("median"))
        budget = f"{r['vram_budget_gb']:g} GB" if r.get("vram_budget_gb") else "none"
        lines.append("| " + " | ".join([
            r["backend"], model, budget,
            f"{fmt(d.get('median'))} ({fmt(d.get('min'))}-{fmt(d.get('max'))})", full,
            fmt((r.get("prefill_tok_s") or {}).get("median"), "{:.1f}"),
            fmt((r.get("ttft_s") or {}).get("median"), "{:.3f}"),
            fmt(r.get("load_time_s"), "{:.1f}"),
            fmt(r["peak_gpu_bytes"] / 1e9 if r.get("peak_gpu_bytes") else None),
            fmt(r["peak_host_bytes"] / 1e9 if r.get("peak_host_bytes") else None),
            (r.get("date") or "")[:10], (r.get("git_commit") or "")[:8] + ("+" if r.get("git_dirty") else ""),
        ]) + " |")
    return "\n".join(lines)


def machine_line(runs: list[dict[str, Any]]) -> str:
    m = runs[-1].get("machine", {})
    bw = m.get("bandwidth", {})
    parts = [f"CPU: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} threads), "
             f"{fmt(m.get('host_total_bytes', 0) / 1e9, '{:.0f}')} GB RAM"]
    measured = [f"{label} {bw[key]} GB/s" for key, label in (
        ("cpu_copy_gb_s", "CPU copy"), ("h2d_pinned_gb_s", "host to GPU pinned"),
        ("h2d_pageable_gb_s", "pageable"), ("gpu_copy_gb_s", "GPU memory")) if bw.get(key)]
    if measured:
        parts.append("measured: " + ", ".join(measured))
    return "; ".join(parts) + "."


def chart(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 5.5), squeeze=False)
    for ax, (card, runs) in zip(axes[0], sorted(groups.items())):
        budgets = sorted({r.get("vram_budget_gb") or 0 for r in runs})
        backends = sorted({r["backend"] for r in runs})
        width = 0.8 / max(len(backends), 1)
        for j, backend in enumerate(backends):
            labelled_backend = False
            for i, b in enumerate(budgets):
                # the run closest to the full depth (measured beats extrapolated), then the latest
                found = [r for r in runs if r["backend"] == backend and (r.get("vram_budget_gb") or 0) == b
                         and decode_full_depth(r)]
                if not found:
                    continue
                best = max(found, key=lambda r: (r.get("layers") or 0, r.get("date") or ""))
                value = decode_full_depth(best)
                bars = ax.bar([i - 0.4 + width * (j + 0.5)], [value], width, color=f"C{j}",
                              hatch="//" if best.get("extrapolated") else None, edgecolor="white",
                              label=None if labelled_backend else backend)
                labelled_backend = True
                ax.bar_label(bars, labels=[f"{value:.2g}" if value < 10 else f"{value:.1f}"], fontsize=7)
        bw = bandwidth_of(runs)
        labelled = False
        for i, b in enumerate(budgets):
            bound = physical_bound(b, bw) if b else None
            if bound:
                ax.hlines(bound, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label=None if labelled else "physical bound (int4 experts, this machine)")
                ax.annotate(f"{bound:.0f}", (i + 0.45, bound), fontsize=7, va="bottom", ha="right")
                labelled = True
        ax.set_xticks(range(len(budgets)), [f"{b:g} GB budget" if b else "no budget" for b in budgets])
        ax.set_ylabel("decode tok/s, batch 1 (48 layers)")
        ax.set_yscale("log")
        models = sorted({r.get("model", "").split("?")[0] for r in runs})
        ax.set_title(f"{card}\n{', '.join(models)}; hatched: extrapolated from fewer layers", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle("Decode speed per backend and VRAM budget (batch 1, at the model's full depth)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: list[dict[str, Any]], chart_path: Path, out_path: Path,
           speed: list[dict[str, Any]] | None = None) -> str:
    speed = speed or []
    failed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        (failed if r.get("error") else groups)[card_of(r)].append(r)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from the runs in `bench/results/`; do not edit by hand.",
        "Each run is one `moechat bench` (see docs/benchmarks.md for what is measured and how), or one run of",
        "`bench/moe_offload_gpu.py` (the moe-offload engine driven directly, said so under its card). Models",
        "named `synthetic:` have the real shapes and random weights; runs with fewer layers than the model",
        "keep every width, and their full-depth decode speed is extrapolated (time per token x 48 / layers).",
        "Budgets are GiB of GPU memory, enforced in the process (see docs/benchmarks.md).",
        "",
    ]
    for data in speed:
        lines += render_speed(data)
    if not runs:
        lines += ["No runs yet: run `bench/gpu_compare.sh` on a GPU machine, commit its JSON files to",
                  "`bench/results/`, then run `python bench/report.py`.", ""]
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
        bounds = [(b, physical_bound(b, bw)) for b in sorted({r.get("vram_budget_gb") for r in rs if r.get("vram_budget_gb")})]
        bounds = [(b, v) for b, v in bounds if v]
        if bounds:
            lines += ["Physical bound for batch-1 decode on this machine with int4 experts: " + "; ".join(
                f"{v:.0f} tok/s at {b:g} GB" for b, v in bounds) + "."
                      + (f" Bandwidths from {bw['source']}." if bw.get("source") else ""), ""]
        lines += [table(rs), ""]
        sources = sorted({r["source"] for r in rs if r.get("source")})
        if sources:
            lines += ["Runs not made by `moechat bench`: " + "; ".join(sources) + " (the engine driven directly; "
                      "its own JSON has every detail).", ""]
        notes = sorted({r["extrapolated"]["note"] for r in rs if r.get("extrapolated")})
        checks = sorted({f"{r['backend']}: {r['plan_check']}" for r in rs if r.get("plan_check")})
        for n in notes + checks:
            lines.append(f"- {n}")
        if notes or checks:
            lines.append("")
        lines += _failures(failed.get(card, []))
    return "\n".join(lines)


# ---- bench/moe_offload_speed.py: the decode and prefill speed of moe-offload, with its bound ----

TOKEN_EXPERTS = 48 * 10          # routed expert uses per decode token of Qwen3-Next-80B
EMBEDDING_BYTES = 151936 * 2048 * 2   # the embedding table: resident, but one row is read per token


def speed_bound(run: dict[str, Any], machine: dict[str, Any]) -> dict[str, float] | None:
    """The physical bound of one decode token of ``run``: every byte that crossed PCIe at the
    pinned host-to-device rate, plus every byte read from GPU memory (resident weights but the
    embedding table, cached experts) at the device copy rate, one after the other (a layer's
    experts wait for its router, so the two overlap little)."""
    if not machine.get("h2d_pinned_gb_s") or not run.get("decode_ms_per_token"):
        return None
    expert = machine.get("expert_bytes", 1622016)
    pcie = run["pcie_mb_per_token"] * 1e6 / (machine["h2d_pinned_gb_s"] * 1e9)
    hbm_bytes = run["resident_gb"] * GiB - EMBEDDING_BYTES + run["decode_hit_rate"] * TOKEN_EXPERTS * expert
    hbm = hbm_bytes / (machine["gpu_copy_gb_s"] * 1e9)
    ms = 1000 * (pcie + hbm)
    return {"bound_ms": ms, "bound_tok_s": 1000 / ms, "share": ms / run["decode_ms_per_token"]}


def speed_parts(run: dict[str, Any], parts: dict[str, Any], machine: dict[str, Any]) -> dict[str, float] | None:
    """Where a token's time goes, from the parts measured alone: the resident step, the cached
    and the missed experts at their per-expert cost, the swaps at the pinned copy rate; what is
    left of the measured time is the host's share (sampling, the cache policy, the graph launch)."""
    if not parts or not parts.get("routed_layer_all_misses_us"):
        return None
    hits = run["decode_hit_rate"] * TOKEN_EXPERTS
    misses = run["zero_copy_experts_per_token"]
    out = {"resident_ms": parts["resident_step_ms"],
           "cached_experts_ms": hits * parts["routed_layer_all_hits_us"] / 10 / 1000,
           "missed_experts_ms": misses * parts["routed_layer_all_misses_us"] / 10 / 1000,
           "swaps_ms": run["experts_swapped_per_token"] * machine.get("expert_bytes", 1622016)
           / (machine["h2d_pinned_gb_s"] * 1e9) * 1000}
    out["host_and_rest_ms"] = run["decode_ms_per_token"] - sum(out.values())
    return out


def load_speed(folder: Path) -> list[dict[str, Any]]:
    """The bench/moe_offload_speed.py results, newest run first."""
    found = []
    for path in sorted(folder.glob("moe_offload_speed_*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") == "bench/moe_offload_speed.py":
            data["_file"] = path.name
            found.append(data)
    return sorted(found, key=lambda d: d.get("environment", {}).get("date_utc", ""), reverse=True)


def render_speed(data: dict[str, Any]) -> list[str]:
    env, machine = data.get("environment", {}), data.get("machine", {})
    runs = [r for r in data.get("runs", []) if not r.get("error")]
    lines = [f"## moe-offload speed: {env.get('gpu', '?')}, {env.get('date_utc', '?')} UTC, commit "
             f"{env.get('commit', '?')}", "",
             f"`bench/moe_offload_speed.py` ({data['_file']}): Qwen3-Next-80B-A3B at full shapes (48 layers), random "
             "weights, int4 routed experts in pinned host memory, bf16 resident part, batch 1, the VRAM budget "
             "enforced. Decode: the CUDA-graph step, sampled at temperature 1, after warm-up tokens. Prefill: "
             f"a {runs[0]['prompt_tokens'] if runs else '?'}-token prompt through transformers' modules with the "
             "engine's routed experts, timed once.", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    if machine:
        lines += [f"Machine, measured in the run: pinned host-to-device {machine['h2d_pinned_gb_s']:.1f} GB/s; the int4 "
                  f"kernel reading experts in place over PCIe {machine['int4_kernel_zero_copy_gb_s']:.1f} GB/s and from "
                  f"GPU memory {machine['int4_kernel_hbm_gb_s']:.0f} GB/s; device copy {machine['gpu_copy_gb_s']:.0f} GB/s; "
                  f"host copy {machine['cpu_copy_gb_s']:.1f} GB/s.", ""]
    head = ("| budget | routing | cache share | decode tok/s | ms/token | hit rate | PCIe MB/token | bound tok/s | "
            "share of bound | prefill tok/s | GPU peak GiB | host peak GiB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        b = speed_bound(r, machine) or {}
        lines.append(
            f"| {r['vram_budget_gb']:g} GB | {r['routing']} | {r['cache_share']:.0%} | **{r['decode_tok_s']:.1f}** | "
            f"{r['decode_ms_per_token']:.1f} | {r['decode_hit_rate']:.1%} | {r['pcie_mb_per_token']:.0f} | "
            f"{fmt(b.get('bound_tok_s'), '{:.0f}')} | {fmt(b.get('share'), '{:.0%}')} | {r['prefill_tok_s']:.0f} | "
            f"{r['gpu_peak_allocated_gb']:.1f} | {r['host_peak_gb']:.1f} |")
    lines.append("")
    failed = [r for r in data.get("runs", []) if r.get("error")]
    for r in failed:
        lines.append(f"- did not finish: {r.get('vram_budget_gb')} GB, {r.get('routing')}: {r['error'][:200]}")
    parts_src = next((r for r in runs if r.get("parts")), None)
    if parts_src:
        pt = parts_src["parts"]
        lines += [f"Parts, each replayed alone from a CUDA graph: the resident step with no routed experts "
                  f"{pt['resident_step_ms']:.2f} ms ({pt['resident_ms_per_layer'] * 1000:.0f} us per layer); one layer's "
                  f"10 routed experts {pt['routed_layer_all_hits_us']:.0f} us when all are cached and "
                  f"{pt['routed_layer_all_misses_us']:.0f} us when all are read over PCIe. Where each run's time per "
                  "token goes, from those parts:", "",
                  "| budget | routing | resident | cached experts | missed experts | swaps | host and rest | measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            sp = speed_parts(r, pt, machine)
            if sp:
                lines.append(f"| {r['vram_budget_gb']:g} GB | {r['routing']} | {sp['resident_ms']:.2f} ms | "
                             f"{sp['cached_experts_ms']:.2f} ms | {sp['missed_experts_ms']:.2f} ms | {sp['swaps_ms']:.2f} ms | "
                             f"{sp['host_and_rest_ms']:.2f} ms | {r['decode_ms_per_token']:.2f} ms |")
        lines.append("")
    for r in runs:
        if r.get("prefill_detail"):
            lines += render_prefill(r)
    base = data.get("same_depth_comparison")
    if base and base.get("moe_offload_over_bnb4"):
        m, t = base["moe_offload"], base["transformers_bnb4"]
        lines += [f"Same run, same depth ({base['layers']} layers at full width) and budget ({base['vram_budget_gb']:g} GB, "
                  f"24 GB scaled to the depth): moe-offload {m['decode_tok_s']:.1f} tok/s, transformers-bnb4 "
                  f"{t['decode_tok_s']:.4f} tok/s: **{base['moe_offload_over_bnb4']:.0f}x**.", ""]
    check = data.get("check", {})
    if check.get("float32"):
        c32, c16 = check["float32"], check.get("bf16", {})
        lines += [f"Check ({c32['layers']} layers, teacher-forced, against transformers' modules on the same weights): "
                  f"float32 logits within {max(c32['max_rel_logit_diff'], 1e-4):.0e} of the largest logit "
                  "(the run rounds to 4 decimals), argmax "
                  f"{c32['argmax_agree']}/{c32['tokens']}; bf16 within {c16.get('max_rel_logit_diff', float('nan')):.2f}, "
                  f"argmax {c16.get('argmax_agree')}/{c16.get('tokens')} (bf16 rounding on random weights).", ""]
    return lines


def render_prefill(run: dict[str, Any], kernels: int = 6) -> list[str]:
    """One run's prefill, several ways on the same engine, and where its time goes."""
    pd = run["prefill_detail"]
    lines = [f"Prefill of {pd['tokens']} tokens at {run['vram_budget_gb']:g} GB, several ways on the same engine "
             "(each timed once, after a warm-up):", "",
             "| way | s | tok/s | hit rate | PCIe GB | experts copied |", "|---|---|---|---|---|---|"]
    for w in pd["ways"]:
        lines.append(f"| {w['way']} | {w['s']:.3f} | **{w['tok_s']:.0f}** | {w['hit_rate']:.1%} | {w['h2d_gb']:.2f} | "
                     f"{w['experts_copied']} |")
    agree = pd.get("grouped_vs_torch", {})
    mods = pd.get("modules_ms", {})
    top = [k for k in pd.get("top_kernels", []) if k["self_gpu_ms"] > 0][:kernels]
    lines += ["", f"The grouped and torch ways give the same last-token logits up to bf16 rounding (largest "
              f"difference {agree.get('max_rel_logit_diff', float('nan')):.4f} of the largest logit, argmax "
              f"{'the same' if agree.get('argmax_agree') else 'different'}). Per module, the model's router, with a "
              "sync around each module: " + "; ".join(f"{k} {v:.0f} ms" for k, v in mods.items()) + ".",
              "", "Most GPU time, by op or kernel: " + "; ".join(
                  f"{k['name'][:60]} {k['self_gpu_ms']:.0f} ms ({k['calls']} calls)" for k in top) + ".", ""]
    return lines


def _failures(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return []
    out = ["Runs that did not finish:", ""]
    for r in sorted(runs, key=lambda r: (r.get("vram_budget_gb") or 0, r["backend"])):
        budget = f" at {r['vram_budget_gb']:g} GB" if r.get("vram_budget_gb") else ""
        out.append(f"- {r['backend']}{budget} on {r.get('model', '?')}: {r['error']}")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate BENCHMARKS.md and the chart from bench/results.")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--chart", default=str(ROOT / "bench" / "chart.png"))
    args = p.parse_args(argv)
    runs = load_runs(Path(args.results))
    out, chart_path = Path(args.out), Path(args.chart)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if not r.get("error"):
            groups[card_of(r)].append(r)
    if groups:
        chart(groups, chart_path)
    out.write_text(render(runs, chart_path, out, load_speed(Path(args.results))))
    print(f"wrote {out}" + (f" and {chart_path}" if groups else "") + f" from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
