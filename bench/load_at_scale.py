"""How long moe-offload's loads take at the full 80B widths, and how much memory they hold.

For each release layout (``fp8``: the block-FP8 release; ``bf16``: the bf16 release) and each
reduced depth, this writes a checkpoint with the real tensor names, shard size and index file
(moechat.backends.fp8_checkpoint, random weights), then loads it the way a person does, through
``moechat bench --backend moe-offload`` (the manager, the worker, the plan):

1. the checkpoint's pages are dropped from the page cache (fsync + posix_fadvise DONTNEED), and the
   folder is read once end to end: the disk's read speed for these files;
2. the first load: read, convert the experts to int4, write the converted-expert cache;
3. the checkpoint's and the cache's pages are dropped again, and the second load reads the cache.

Each load is one ``moechat bench`` result (the benchmark schema, kind ``product``) whose case
holds the load's stages with their seconds (``detail.load_stages``), the worker's host peak
(``peak_host_bytes``, VmHWM) and its resident memory after the load
(``detail.host_rss_after_load_bytes``), and the GPU peak. This script's own measurements (write
and read speed, checkpoint bytes) go into each result's notes. docs/moe-offload.md ("Loading at
full size") has the extrapolation to 48 layers.

    python bench/load_at_scale.py --root /root/load --out bench/results/load-DATE-CARD \
        --formats fp8 bf16 --layers 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 64 * 2**20
MODEL = "synthetic:qwen3-next-80b-a3b"


# how each result says which load it measured (bench/report.py gives such results a table of their own)
CHECKPOINT = "Checkpoint:"
FIRST_LOAD = "First load:"
CACHED_LOAD = "Cached load:"


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_cache(folder: Path) -> None:
    """Write back and drop the page-cache pages of every file under ``folder``."""
    for path in files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(folder: Path) -> tuple[int, float]:
    """(bytes, seconds) of reading every file under ``folder`` once, in order."""
    total, started = 0, time.perf_counter()
    for path in files(folder):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                total += len(chunk)
    return total, time.perf_counter() - started


def bench(folder: Path, cache: Path, out: Path, budget: float, notes: list[str], settings: list[str]) -> dict:
    cmd = [sys.executable, "-m", "moechat.webui.cli", "bench", "--backend", "moe-offload", "--model", str(folder),
           "--set", f"cache_dir={cache}", "--vram-budget-gb", f"{budget:g}", "--prompt-tokens", "64",
           "--gen-tokens", "8", "--repeat", "1", "--warmup", "0", "--no-progress", "--bandwidth-mb", "0",
           "--json", str(out)]
    for n in notes:
        cmd += ["--note", n]
    for kv in settings:
        cmd += ["--set", kv]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
    case = json.loads(out.read_text())["cases"][0] if out.exists() else {}
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "load_s": case.get("load_time_s"), "stages": case.get("detail", {}).get("load_stages"),
            "peak_host_gb": round((case.get("peak_host_bytes") or 0) / 1e9, 2),
            "rss_after_load_gb": round((case.get("detail", {}).get("host_rss_after_load_bytes") or 0) / 1e9, 2),
            "peak_gpu_gb": round((case.get("peak_gpu_bytes") or 0) / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:
    from moechat.backends import fp8_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder for the checkpoints and caches (needs ~30 GB free)")
    parser.add_argument("--out", required=True, help="folder for the result JSON files")
    parser.add_argument("--formats", nargs="+", choices=("fp8", "bf16"), default=["fp8", "bf16"])
    parser.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--budget", type=float, default=16.0, help="the card a run stands for, GiB")
    parser.add_argument("--reuse", action="append", default=[], metavar="FMT:LAYERS=FOLDER",
                        help="a checkpoint already written for that layout and depth (kept afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written here")
    parser.add_argument("--model", default=MODEL, help="the synthetic shapes to write (default: the 80B's)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a moe-offload setting for the loads (repeatable)")
    args = parser.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    reuse = {}
    for r in args.reuse:
        key, _, folder = r.partition("=")
        reuse[key] = Path(folder)
    summary = []
    for fmt in args.formats:
        for layers in args.layers:
            key = f"{fmt}:{layers}"
            folder = reuse.get(key) or root / f"{args.model.split(':')[-1]}-{layers}l-{fmt}"
            write_s = None
            if not folder.is_dir():
                started = time.perf_counter()
                fp8_checkpoint.write(f"{args.model}?layers={layers}", folder, fmt=fmt)
                write_s = round(time.perf_counter() - started, 1)
            drop_cache(folder)
            nbytes, read_s = read_all(folder)
            drop_cache(folder)
            read_gb_s = nbytes / read_s / 1e9
            notes = [f"{CHECKPOINT} {fmt} release layout, {layers} layers, {nbytes / 1e9:.2f} GB in "
                     f"{len(list(folder.glob('*.safetensors')))} shards"
                     + (f", written in {write_s} s" if write_s is not None else "") + "; read end to end with "
                     f"its pages dropped from the page cache: {read_s:.1f} s ({read_gb_s:.2f} GB/s)."]
            cache = root / f"cache-{fmt}-{layers}l"
            shutil.rmtree(cache, ignore_errors=True)
            first = bench(folder, cache, out / f"load-{fmt}-{layers}l-first.json", args.budget,
                          notes + [FIRST_LOAD + " reads the checkpoint, converts the experts, writes the cache."],
                          args.settings)
            drop_cache(folder)
            if cache.is_dir():
                drop_cache(cache)
            cached = bench(folder, cache, out / f"load-{fmt}-{layers}l-cached.json", args.budget,
                           notes + [CACHED_LOAD + " the converted experts come from the cache, its pages dropped "
                                    "from the page cache first."], args.settings)
            row = {"format": fmt, "layers": layers, "checkpoint_gb": round(nbytes / 1e9, 2), "write_s": write_s,
                   "read_s": round(read_s, 1), "read_gb_s": round(read_gb_s, 2), "first": first, "cached": cached}
            summary.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            if key not in reuse and not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    (out / "load-summary.txt").write_text("\n".join(json.dumps(r) for r in summary) + "\n")
    return 0 if all(r["first"]["rc"] == 0 and r["cached"]["rc"] == 0 for r in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
