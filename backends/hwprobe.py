"""Measure this machine's memory bandwidths: CPU copy, host-to-device (pinned and pageable) and
device copy. Prints one JSON object. Run in its own process by ``moechat bench`` so the
allocations do not linger in the bench process:

    python -m moechat.backends.hwprobe [--mb 256] [--repeat 5]

Every number is GB/s (10^9 bytes per second) of bytes moved one way; a copy reads and writes
each byte, so ``cpu_copy_gb_s`` counts the bytes copied (read + write is twice that).
``cpu_read_gb_s`` is a streaming reduction (each byte read once, nothing written): the bound of a
kernel that only reads its weights, such as moe-offload's CPU experts.
"""

from __future__ import annotations

import argparse
import json
import time


def best_rate(fn, nbytes: int, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def measure_cpu(mb: int = 256, repeat: int = 5, threads: int | None = None) -> dict:
    """Host memory alone: copy and read rates with ``threads`` torch threads (default: torch's)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        n = mb * 1024 * 1024
        src = torch.ones(n, dtype=torch.uint8)
        dst = torch.empty_like(src)
        words = src.view(torch.float32)
        return {"probe_threads": torch.get_num_threads(),
                "cpu_copy_gb_s": round(best_rate(lambda: dst.copy_(src), n, repeat), 2),
                "cpu_read_gb_s": round(best_rate(lambda: words.sum(), n, repeat), 2)}
    finally:
        torch.set_num_threads(before)


def measure(mb: int = 256, repeat: int = 5) -> dict:
    import torch

    n = mb * 1024 * 1024
    out: dict = {"buffer_mb": mb, "repeat": repeat, "torch": torch.__version__, "threads": torch.get_num_threads()}
    cpu = measure_cpu(mb, repeat)
    out.update(cpu_copy_gb_s=cpu["cpu_copy_gb_s"], cpu_read_gb_s=cpu["cpu_read_gb_s"])
    src = torch.ones(n, dtype=torch.uint8)
    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        pinned = src.pin_memory()
        out["h2d_pinned_gb_s"] = round(best_rate(lambda: dev.copy_(pinned, non_blocking=True), n, repeat, sync), 2)
        out["h2d_pageable_gb_s"] = round(best_rate(lambda: dev.copy_(src), n, repeat, sync), 2)
        dev2 = torch.empty_like(dev)
        # device copy reads and writes: count both, as a GPU's bandwidth figure does
        out["gpu_copy_gb_s"] = round(2 * best_rate(lambda: dev2.copy_(dev), n, repeat, sync), 1)
        out["gpu_name"] = torch.cuda.get_device_name(0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(json.dumps(measure(args.mb, args.repeat)))


if __name__ == "__main__":
    main()
