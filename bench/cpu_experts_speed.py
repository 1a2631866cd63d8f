"""The CPU expert kernel (moe-offload's cpu_experts.c) against this machine's host-memory bandwidth.

One MoE layer of the 80B shapes (hidden 2048, expert intermediate 512, int4 group 128, random
bytes), ``--layer-experts`` experts in host memory (well beyond the last-level cache). Per thread
count, one layer call of ``n`` experts (10: a decode token's misses; 64: a prefill-ish call with
many distinct experts) is timed over calls that each read experts no recent call read, and the
rate is the int4 bytes + bf16 scales read per call over its time (best of ``--repeat`` timings of
``--calls`` calls, in each of ``--runs`` passes). Next to it, the host-memory read bandwidth of
``moechat.backends.hwprobe`` at the same thread count (a streaming reduction: bytes read once),
so ``share_of_read_bw`` = kernel / read bandwidth says how close to memory-bound the kernel is,
and ``cached_gb_s``, the kernel on 2 experts that stay in the caches (its arithmetic's rate),
says which bound to expect (``predicted_bound``). Writes one JSON object (not the benchmark
schema of ``moechat.backends.benchmark``: no model runs here, so it goes under bench/kernels/,
which bench/report.py does not read):

    python bench/cpu_experts_speed.py [--threads 1 2 15] [--runs 3] [--out bench/kernels/cpu_experts_CPU_DATE.json]
    git show main~5:backends/moe_offload/cpu_experts.c > /tmp/old.c      # an older kernel beside it
    python bench/cpu_experts_speed.py --baseline /tmp/old.c
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

PRODUCER = "bench/cpu_experts_speed.py"


def kernel_rate(cpu, store, n: int, calls: int, repeat: int, hot: bool = False) -> dict:
    """GB/s of int4 weights + scales through ``cpu.layer`` for calls of ``n`` experts: from
    memory, or ``hot`` (the same experts every call, from the caches: the arithmetic's rate)."""
    import torch

    e = store.num_experts
    x = torch.randn(store.hidden) * 0.5
    w = torch.full((n,), 1.0 / n)
    # consecutive calls walk the layer's experts, so an expert comes back only after the whole
    # layer (far more than the last-level cache) has been read
    picks = [torch.arange(0 if hot else i * n, (0 if hot else i * n) + n).remainder(e).int()
             for i in range(calls * (repeat + 1))]
    cpu.layer(0, x, picks[0], w)
    times = []
    for r in range(repeat):
        chunk = picks[(r + 1) * calls:(r + 2) * calls]
        t0 = time.perf_counter()
        for ids in chunk:
            cpu.layer(0, x, ids, w)
        times.append((time.perf_counter() - t0) / calls)
    best = min(times)
    nbytes = n * store.expert_bytes()
    return {"experts_per_call": n, "bytes_per_call": nbytes, "best_us": round(best * 1e6, 1),
            "median_us": round(sorted(times)[len(times) // 2] * 1e6, 1),
            "gb_s": round(nbytes / best / 1e9, 2)}


def measure(cpu, store, threads: int, args, hwprobe) -> list[dict]:
    """One row per call size: the kernel's best rate next to the memory's at ``threads``."""
    # best of --runs passes, each measuring the memory, the arithmetic and every call size in
    # turn (on a machine shared with other work, a pass may catch a busy moment)
    probe, hot, rates = {}, 0.0, {}
    for _ in range(args.runs):
        seen = hwprobe.measure_cpu(args.probe_mb, args.repeat, threads)
        probe = {k: max(v, probe.get(k, 0)) for k, v in seen.items()}
        # the prediction: the arithmetic's rate (2 experts, 3.2 MB, from the caches) against the
        # memory's: the kernel is memory-bound where the first is the larger
        hot = max(hot, kernel_rate(cpu, store, 2, args.calls, args.repeat, hot=True)["gb_s"])
        for n in args.experts:
            rate = kernel_rate(cpu, store, n, args.calls, args.repeat)
            if rate["gb_s"] > rates.get(n, {}).get("gb_s", 0):
                rates[n] = rate
    rows = []
    for n in args.experts:
        row = {"threads": threads, "kernel": cpu.why, **rates[n], "cached_gb_s": hot, **probe}
        row["share_of_read_bw"] = round(row["gb_s"] / probe["cpu_read_gb_s"], 3)
        row["predicted_bound"] = "memory" if hot > probe["cpu_read_gb_s"] else "arithmetic"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="kernel thread counts (default: 1, 2 and the cores less one)")
    p.add_argument("--experts", type=int, nargs="+", default=[10, 64], help="experts per layer call")
    p.add_argument("--layer-experts", type=int, default=256, help="experts in the layer's store")
    p.add_argument("--calls", type=int, default=20, help="calls per timing")
    p.add_argument("--repeat", type=int, default=7, help="timings per case (the best counts)")
    p.add_argument("--runs", type=int, default=3, help="passes per thread count (the best of each rate counts)")
    p.add_argument("--probe-mb", type=int, default=256, help="hwprobe's buffer")
    p.add_argument("--torch", action="store_true", help="also time the torch fallback (slow)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another cpu_experts.c (an earlier commit's) timed the same way on the same store")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file (default: bench/kernels/cpu_experts_CPU_DATE.json)")
    args = p.parse_args()

    import torch

    from moechat.backends import benchmark, hwprobe, synthetic
    from moechat.backends.moe_offload import MoeOffloadSettings
    from moechat.backends.moe_offload.cpu import SOURCE, CpuExperts, default_threads
    from moechat.backends.moe_offload.store import ExpertStore
    from moechat.backends.shapes import shapes

    # Qwen3-Next-80B-A3B's expert shapes and moe-offload's default int4 group
    eighty_b = shapes(synthetic.config("synthetic:qwen3-next-80b-a3b"))
    hidden, inter = eighty_b.hidden, eighty_b.expert_intermediate
    group = MoeOffloadSettings.model_fields["int4_group_size"].default

    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, min(2, cores), default_threads()})
    store = ExpertStore.random("int4", (0,), args.layer_experts, hidden, inter, torch.float32, group,
                               distinct_layers=1)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            for source in [SOURCE, args.baseline] if args.baseline else [SOURCE]:
                cpu = CpuExperts(store, (0,), threads=t, cache_dir=Path(tmp), source=source)
                rows = measure(cpu, store, t, args, hwprobe)
                for row in rows:
                    row["source"] = "this checkout" if source == SOURCE else str(source)
                    print(json.dumps(row), file=sys.stderr)
                cases += rows
                cpu.close()
            if args.torch:
                ref = CpuExperts(store, (0,), threads=t, compiled=False)
                with_threads = torch.get_num_threads()
                torch.set_num_threads(t)
                for n in args.experts:
                    cases.append({"threads": t, "kernel": ref.why, "source": "torch fallback",
                                  **kernel_rate(ref, store, n, max(2, args.calls // 10), 2)})
                torch.set_num_threads(with_threads)
    commit, dirty = benchmark.git_commit()
    out = {"producer": PRODUCER, "date": benchmark.now(), "commit": commit, "dirty": dirty,
           "cpu": benchmark.cpu_name(), "cpu_count": cores, "torch": torch.__version__,
           "settings": {"runs": args.runs, "repeat": args.repeat, "calls": args.calls, "probe_mb": args.probe_mb},
           "shapes": {"hidden": hidden, "intermediate": inter, "group": group, "layer_experts": args.layer_experts,
                      "expert_bytes": store.expert_bytes()},
           "cases": cases}
    text = json.dumps(out, indent=1)
    print(text)
    path = args.out or default_out()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def default_out() -> Path:
    from moechat.backends import benchmark
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", benchmark.cpu_name()).strip("-")[:40]
    return Path(__file__).resolve().parent / "kernels" / f"cpu_experts_{cpu}_{benchmark.now()[:10]}.json"


if __name__ == "__main__":
    main()
