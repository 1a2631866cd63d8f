"""moe-offload at the full Qwen3-Next-80B shapes with random weights, next to transformers-bnb4.

No checkpoint: the resident part (attention, Gated DeltaNet, router, shared experts, embeddings)
is built on the GPU in bf16 with random weights, and the routed experts are random int4 bytes in
pinned host memory (48 layers x 512 experts, about 40 GB). For each VRAM budget the engine sizes
its expert cache, the budget is enforced with torch.cuda.set_per_process_memory_fraction, and a
random prompt is prefilled and tokens are decoded (sampled at temperature 1, batch 1).

The baseline is the repo's transformers-bnb4 backend (NF4, accelerate offload, fused experts
quantized too) loading a random checkpoint of the same widths at reduced depth, with the GPU
budget scaled to the depth; moe-offload is run at that depth and budget too.

    python bench/moe_offload_gpu.py all --out results.json      # everything, phases in subprocesses
    python bench/moe_offload_gpu.py offload --layers 2 --experts 64 --device cpu   # a CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "backends" / "moe_offload" / "qwen3_next_80b.json"
GiB = 1024**3


def peak_host_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_config(layers: int, experts: int | None = None):
    from transformers import Qwen3NextConfig

    d = json.loads(CONFIG.read_text())
    for k in ("architectures", "transformers_version", "torch_dtype", "model_type"):
        d.pop(k, None)
    d["num_hidden_layers"] = layers
    if experts:
        d["num_experts"] = experts
    return Qwen3NextConfig(**d)


def sync(dev):
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()


def run_offload(args) -> dict:
    import torch

    from moechat.backends.moe_offload.adapters.qwen3_next import Qwen3NextAdapter
    from moechat.backends.moe_offload.build import random_resident
    from moechat.backends.moe_offload.engine import Engine, Options, Sampler
    from moechat.backends.moe_offload.store import ExpertStore
    from moechat.backends.planning import cap_vram

    dev = args.device
    cfg = load_config(args.layers, args.experts)
    if args.null_experts:
        # Ablation: routed experts contribute nothing and cost nothing (no sync, no copy), which
        # leaves the resident part's own time per token.
        from moechat.backends.moe_offload.engine import OffloadedExperts
        OffloadedExperts.forward = lambda self, x, top_k_index, top_k_weights: torch.zeros_like(x)
    if args.uniform_routing:
        # Worst case for a cache: every token picks top_k experts uniformly at random, with no
        # locality from one token to the next (real routing has some; a random model's has more).
        from moechat.backends.moe_offload.engine import OffloadedExperts
        original = OffloadedExperts.forward

        def uniform(self, x, top_k_index, top_k_weights):
            r = torch.rand(top_k_index.shape[0], self.store.num_experts, device=top_k_index.device)
            return original(self, x, r.topk(top_k_index.shape[1], dim=-1).indices, top_k_weights)
        OffloadedExperts.forward = uniform
    adapter = Qwen3NextAdapter()
    sh = adapter.shapes(cfg)
    t0 = time.perf_counter()
    store = ExpertStore.random("int4", sh.moe_layers, sh.num_experts, sh.hidden, sh.intermediate,
                               torch.bfloat16, 128, pin=dev == "cuda")
    out = {"layers": args.layers, "num_experts": sh.num_experts, "top_k": sh.top_k,
           "routing": "uniform random (forced)" if args.uniform_routing else "the random model's router",
           "null_experts": args.null_experts, "policy": args.policy,
           "experts_host_gb": round(store.total_bytes() / GiB, 2),
           "store_build_s": round(time.perf_counter() - t0, 1), "runs": []}
    g = torch.Generator().manual_seed(0)
    for budget in args.budgets:
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cap_vram(budget)
        opts = Options(expert_format="int4", device=dev, dtype=torch.bfloat16, vram_budget_gb=budget,
                       max_context=args.context, miss_policy=args.policy, cache_experts=args.cache_experts)
        t0 = time.perf_counter()
        eng = Engine.assemble(cfg, adapter, store, opts, random_resident)
        sync(dev)
        run = {"vram_budget_gb": budget, "assemble_s": round(time.perf_counter() - t0, 1)}
        run.update({k: eng.info[k] for k in ("cache_slots_per_layer", "resident_gb", "expert_cache_gb",
                                             "kv_cache_gb", "miss_policy")})
        run["cache_share"] = round(eng.info["cache_slots_per_layer"] / sh.num_experts, 3)
        c = eng.counters
        # A first prompt compiles and autotunes kernels and fills the cache; the timed prompt is a
        # second, different one, as in a chat's second message.
        warm = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
        t0 = time.perf_counter()
        eng.forward(warm, None, logits_to_keep=1)
        sync(dev)
        run["first_prefill_s"] = round(time.perf_counter() - t0, 2)
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
        c.reset()
        sync(dev)
        t0 = time.perf_counter()
        logits, cache = eng.forward(ids, None, logits_to_keep=1)
        sync(dev)
        prefill_s = time.perf_counter() - t0
        run.update({"prompt_tokens": args.prompt, "prefill_s": round(prefill_s, 3),
                    "prefill_tok_s": round(args.prompt / prefill_s, 1),
                    "prefill_hit_rate": round(c.hits / max(c.hits + c.misses, 1), 4),
                    "prefill_h2d_gb": round(c.bytes_h2d / 1e9, 2)})
        sampler = Sampler(temperature=1.0, seed=0)
        tok = sampler(logits[0, -1], [])
        times = []
        for i in range(args.warmup + args.decode):
            if i == args.warmup:
                c.reset()
                sync(dev)
                t_dec = time.perf_counter()
            t1 = time.perf_counter()
            logits, cache = eng.forward(torch.tensor([[tok]]), cache, logits_to_keep=1)
            tok = sampler(logits[0, -1], [])     # .item(): one host sync per token, as in a chat
            times.append(time.perf_counter() - t1)
        sync(dev)
        dec_s = time.perf_counter() - t_dec
        n = args.decode
        lookups = max(c.hits + c.misses, 1)
        run.update({
            "decode_tokens": n, "warmup_tokens": args.warmup,
            "decode_tok_s": round(n / dec_s, 2), "decode_ms_per_token": round(1000 * dec_s / n, 1),
            "decode_ms_per_layer": round(1000 * dec_s / n / args.layers, 2),
            "decode_hit_rate": round(c.hits / lookups, 4),
            "pcie_mb_per_token": round(c.bytes_h2d / n / 1e6, 1),
            "cpu_experts_per_token": round(c.cpu_experts / n, 2),
            "first_warmup_token_ms": round(1000 * times[0], 1),
        })
        if dev == "cuda":
            run["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
            run["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GiB, 2)
        run["host_peak_gb"] = round((peak_host_bytes() or 0) / GiB, 2)
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
        del eng, cache, logits
    out["host_peak_gb"] = round((peak_host_bytes() or 0) / GiB, 2)
    return out


def write_random_checkpoint(cfg, folder: Path, device: str) -> int:
    """A per-expert (release-layout) bf16 checkpoint of random weights; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3NextForCausalLM

    from moechat.backends.demo import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = Qwen3NextForCausalLM(cfg)
    shard, shard_bytes, n_shard, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            n_shard += 1
            shard, shard_bytes = {}, 0

    def add(name, shape, std=0.02, fill=None):
        nonlocal shard_bytes, total
        t = torch.empty(shape, device=device, dtype=torch.float32)
        if fill is not None:
            t.fill_(fill)
        else:
            t.normal_(0, std)
        shard[name] = t.to(torch.bfloat16).cpu()
        shard_bytes += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if shard_bytes > 2 * GiB:
            flush()

    for n, p in meta.named_parameters():
        if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
            prefix = n.rsplit(".", 1)[0]
            e, r, c = p.shape
            for i in range(e):
                if n.endswith("gate_up_proj"):
                    add(f"{prefix}.{i}.gate_proj.weight", (r // 2, c))
                    add(f"{prefix}.{i}.up_proj.weight", (r // 2, c))
                else:
                    add(f"{prefix}.{i}.down_proj.weight", (r, c))
        elif n.endswith("A_log"):
            add(n, p.shape, fill=1.0)
        elif n.endswith("dt_bias") or n.endswith("linear_attn.norm.weight"):
            add(n, p.shape, fill=1.0)
        elif p.dim() == 1:
            add(n, p.shape, fill=0.0)
        else:
            add(n, p.shape)
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    train_tokenizer(folder)
    return total


def run_bnb(args) -> dict:
    import torch

    from moechat.backends.bnb4 import Bnb4Backend

    cfg = load_config(args.layers)
    folder = Path(args.workdir) / f"random-{args.layers}l"
    t0 = time.perf_counter()
    nbytes = write_random_checkpoint(cfg, folder, args.device)
    out = {"layers": args.layers, "checkpoint_gb": round(nbytes / GiB, 2),
           "checkpoint_write_s": round(time.perf_counter() - t0, 1), "gpu_memory_gb": args.budget}
    gc.collect()
    backend = Bnb4Backend()
    settings = Bnb4Backend.Settings(model=str(folder), device="cuda", gpu_memory_gb=args.budget,
                                    cpu_memory_gb=100)
    t0 = time.perf_counter()
    info = backend.load(settings, lambda p: None)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out["load_info"] = {k: v for k, v in info.items() if k != "model_name"}
    model = backend.model
    out["gpu_allocated_after_load_gb"] = round(torch.cuda.memory_allocated() / GiB, 2)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (1, args.prompt), generator=g).to("cuda")

    def gen(n):
        sync("cuda")
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync("cuda")
        return time.perf_counter() - t

    t_first = gen(1)                 # prefill + one token (includes any first-call setup)
    t_one = gen(1)
    t_many = gen(1 + args.decode)
    dec = (t_many - t_one) / args.decode
    out.update({
        "prompt_tokens": args.prompt, "first_call_s": round(t_first, 2),
        "prefill_s": round(t_one, 3), "prefill_tok_s": round(args.prompt / t_one, 2),
        "decode_tokens": args.decode, "decode_s_per_token": round(dec, 3),
        "decode_tok_s": round(1 / dec, 4), "decode_ms_per_layer": round(1000 * dec / args.layers, 1),
        "gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GiB, 2),
        "host_peak_gb": round((peak_host_bytes() or 0) / GiB, 2), "device_of_first_param": str(dev),
    })
    return out


def phase(cmd: list[str], timeout: int, without_fla: bool = False, script: str = __file__) -> dict:
    """Run one part (``script`` with ``cmd``) in its own process (clean peak-memory numbers, and a
    crash stays contained); its last JSON line is the result.
    ``without_fla``: drop PYTHONPATH entries holding fla, so transformers uses its torch fallback."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    if without_fla:
        env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if "fla" not in p)
    try:
        p = subprocess.run([sys.executable, script, *cmd], capture_output=True, text=True, timeout=timeout, env=env)
        sys.stderr.write(p.stderr[-4000:])
        lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
        if p.returncode == 0 and lines:
            return json.loads(lines[-1])
        return {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-1500:], "partial": lines}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"error": f"timed out after {timeout} s", "partial": [ln for ln in out.splitlines() if ln.startswith("{")],
                "elapsed_s": round(time.perf_counter() - t0)}


def environment() -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    env["commit"] = os.environ.get("BENCH_COMMIT", "")
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=ROOT).stdout.strip()
        except OSError:
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": p.name, "gpu_total_gb": round(p.total_memory / GiB, 1)})
    try:
        import fla  # noqa: F401
        env["fla"] = getattr(fla, "__version__", "yes")
    except ImportError:
        env["fla"] = None
    try:
        import bitsandbytes
        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    import psutil
    env["host_ram_gb"] = round(psutil.virtual_memory().total / GiB, 1)
    env["cpu_count"] = os.cpu_count()
    return env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["offload", "bnb", "all"])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=[24.0, 16.0])
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--cache-experts", type=int, default=None)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--base-layers", type=int, default=4)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--uniform-routing", action="store_true")
    ap.add_argument("--null-experts", action="store_true", help="ablation: routed experts skipped")
    ap.add_argument("--bnb-timeout", type=int, default=380)
    ap.add_argument("--workdir", default="/tmp/moe-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.what == "offload":
        print(json.dumps(run_offload(args)))
        return
    if args.what == "bnb":
        print(json.dumps(run_bnb(args)))
        return
    result = {"environment": environment(), "notes": [
        "Random weights, no checkpoint; routing of a random model is close to uniform, as Qwen3 routing is "
        "(docs/facts.md), so LRU hit rates sit near the cache's share of experts.",
        "Decode: sampled at temperature 1 (random model), batch 1, after warmup tokens; one host sync per token.",
        "Reduced depth: the GPU budget is scaled as embeddings + (budget - embeddings) * depth / 48.",
        "transformers-bnb4 runs without fla: with fla installed, the Gated DeltaNet layers that accelerate "
        "offloads to the CPU fail inside fla's Triton kernels (CPU tensors). moe-offload is measured at the "
        "same depth with and without fla.",
    ]}
    out_path = Path(args.out) if args.out else None

    def save():
        if out_path:
            out_path.write_text(json.dumps(result, indent=1))

    base_budget = 24.0
    emb = 2 * 151936 * 2048 * 2 / GiB
    scaled = round(emb + (base_budget - emb) * args.base_layers / 48, 2)
    common = ["--prompt", str(args.prompt), "--decode", str(args.decode), "--warmup", str(args.warmup)]
    if "offload48" not in args.skip:
        result["moe_offload_48_layers"] = phase(["offload", "--layers", "48", "--budgets", *map(str, args.budgets),
                                                 *common], 240)
        save()
    if "offload48_uniform" not in args.skip:
        result["moe_offload_48_layers_uniform_routing"] = phase(
            ["offload", "--layers", "48", "--uniform-routing", "--budgets", *map(str, args.budgets), *common], 240)
        save()
    if "offload_small" not in args.skip:
        result[f"moe_offload_{args.base_layers}_layers"] = phase(
            ["offload", "--layers", str(args.base_layers), "--budgets", str(scaled), *common], 120)
        save()
    if "offload_small_nofla" not in args.skip:
        result[f"moe_offload_{args.base_layers}_layers_without_fla"] = phase(
            ["offload", "--layers", str(args.base_layers), "--budgets", str(scaled), *common], 150, without_fla=True)
        save()
    if "bnb" not in args.skip:
        result[f"transformers_bnb4_{args.base_layers}_layers"] = phase(
            ["bnb", "--layers", str(args.base_layers), "--budget", str(scaled), "--prompt", "64",
             "--decode", "4"], args.bnb_timeout, without_fla=True)
        save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
