"""How fast moe-offload's first load converts checkpoint experts to int4, one tensor at a time
against in batches.

    python bench/convert_speed.py [--experts 8] [--rounds 3] [--device auto|cpu|cuda]
                                  [--batch-weights N ...] [--json OUT]

For ``--experts`` experts at Qwen3-Next-80B's shapes (gate and up [512, 2048], down [2048, 512]) in
both release layouts (bf16, and block-FP8: float8_e4m3fn with float32 scales per 128x128 block) it
times the conversion into an int4 ``ExpertStore`` (group 128, the load's quantizer) two ways:
``put``, one tensor at a time (the load before batching), and ``add`` + ``flush``, the load's
batched path (``store.CONVERT_BATCH_WEIGHTS`` weights a batch on the converting device, or each
``--batch-weights`` given). The tensors start in pageable host memory, as the checkpoint reader
leaves them; the time ends when every converted byte is in the host store (the GPU's and pinned
buffers kept from round to round, as they are from batch to batch in a load). Each way is timed
``--rounds`` times in turn and the best kept, so other work on a shared machine slows none more
than the others. It prints seconds per GB of checkpoint and per layer of 512 experts (the per-GB
figure times one layer's bytes: 1.61 GB of FP8 with its scales, 3.22 GB of bf16).
docs/moe-offload.md ("Loading at full size") has the numbers and how they were made.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moechat.backends import synthetic
from moechat.backends.moe_offload import MoeOffloadSettings
from moechat.backends.moe_offload import quant
from moechat.backends.moe_offload import store as store_mod
from moechat.backends.shapes import shapes

# Qwen3-Next-80B-A3B's expert shapes (its config, as moechat.backends.synthetic keeps it) and the
# default int4 group of moe-offload's settings
EIGHTY_B = shapes(synthetic.config("synthetic:qwen3-next-80b-a3b"))
HIDDEN, INTERMEDIATE, EXPERTS_PER_LAYER = EIGHTY_B.hidden, EIGHTY_B.expert_intermediate, EIGHTY_B.num_experts
GROUP = MoeOffloadSettings.model_fields["int4_group_size"].default
BLOCK = (128, 128)


def checkpoint_tensors(fmt: str, experts: int, seed: int = 0) -> list[tuple]:
    """(expert, proj, weight, scale) in the checkpoint's order (experts as strings: 0, 1, 10, ...)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in sorted(range(experts), key=str):
        for proj in ("down", "gate", "up"):
            shape = (HIDDEN, INTERMEDIATE) if proj == "down" else (INTERMEDIATE, HIDDEN)
            w = torch.randn(*shape, generator=g) * 0.02
            if fmt == "fp8":
                q, s = quant.fp8_quantize(w, BLOCK)
                out.append((e, proj, q, s))
            else:
                out.append((e, proj, w.to(torch.bfloat16), None))
    return out


def checkpoint_bytes(tensors) -> int:
    return sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * s.element_size())
               for _, _, w, s in tensors)


def convert(tensors, how: str, device: torch.device | None, experts: int) -> float:
    """Seconds to convert ``tensors`` into a fresh int4 store, ``put`` or ``add`` + ``flush``."""
    pin = device is not None and device.type == "cuda"
    store = store_mod.ExpertStore("int4", (0,), experts, HIDDEN, INTERMEDIATE, torch.bfloat16, GROUP,
                                  pin=pin, convert_on=device)
    for proj in ("gate_up", "down"):      # the store's memory is allocated before the load converts
        store._alloc(0, proj)
    if pin:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for e, proj, w, s in tensors:
        getattr(store, how)(0, e, proj, w, s, BLOCK if s is not None else None)
    store.flush(release=False)   # a load gives the buffers back once, not every 8 experts
    if pin:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(experts: int = 8, rounds: int = 3, device: str = "auto",
            batch_weights: list[int] | None = None) -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    convert_on = dev if dev.type == "cuda" else None
    default = store_mod.CONVERT_BATCH_WEIGHTS
    ways = [("put", None)] + [("add", n) for n in (batch_weights or [default.get(dev.type, default["cpu"])])]
    rows = []
    for fmt in ("fp8", "bf16"):
        tensors = checkpoint_tensors(fmt, experts)
        gb = checkpoint_bytes(tensors) / 1e9
        best = {w: float("inf") for w in ways}
        for _ in range(rounds + 1):           # the first round warms up
            for how, n in ways:
                store_mod.CONVERT_BATCH_WEIGHTS = {**default, dev.type: n} if n else default
                try:
                    s = convert(tensors, how, convert_on, experts)
                finally:
                    store_mod.CONVERT_BATCH_WEIGHTS = default
                best[(how, n)] = min(best[(how, n)], s) if _ else best[(how, n)]
        for (how, n), s in best.items():
            per_gb = s / gb
            layer_gb = gb / experts * EXPERTS_PER_LAYER
            rows.append({"checkpoint": fmt, "way": "one tensor at a time" if how == "put" else
                         f"batches of {n / 2**20:g} M weights", "seconds": s, "checkpoint_gb": gb,
                         "s_per_gb": per_gb, "s_per_layer": per_gb * layer_gb})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "experts": experts, "rounds": rounds, "rows": rows}


def table(result: dict) -> str:
    lines = ["| checkpoint | conversion | s per GB of checkpoint | s per layer (512 experts) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['checkpoint']} | {r['way']} | {r['s_per_gb']:.2f} | {r['s_per_layer']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--batch-weights", type=int, nargs="*", help="batch sizes (weights) to time besides one at a time")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args(argv)
    result = measure(a.experts, a.rounds, a.device, a.batch_weights)
    print(table(result))
    print(f"\n{result['device']}; {a.experts} experts of each layout, the best of {a.rounds} rounds")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
