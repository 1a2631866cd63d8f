"""moe-offload's decode and prefill speed at the full Qwen3-Next-80B shapes, with the bound.

The engine-level profile: the engine is built by the backend's own load (MoeOffloadBackend.load
on ``synthetic:qwen3-next-80b-a3b``: random weights, no checkpoint, the resident part in bf16 on
the GPU, 48 x 512 routed experts as random int4 bytes in pinned host memory, 37 GiB), then
measured part by part. It writes the one benchmark schema (moechat.backends.benchmark, kind
"engine-profile"; docs/benchmarks.md): one case per budget and routing, with what is measured
here in each case's ``detail`` and the run's ``detail``:

* ``machine``: the bandwidths that bound a token: pinned host-to-device copies, the int4 kernel
  reading experts in place over PCIe (all misses) and from GPU memory (all hits);
* ``parts``: the time of each part of a decode token, measured alone (the resident step with no
  routed experts, one layer's routed experts all hits and all misses), replayed from CUDA graphs;
* ``check``: the graphed step against transformers' modules on the same weights (teacher-forced
  logits), at reduced depth;
* ``runs``: per VRAM budget (enforced) and routing (the random model's router, and uniform random
  routing in prefill and decode: a cache's worst case), prefill of a long prompt and timed decode
  tokens, the hit rate,
  PCIe bytes per token, GPU and host peaks, and the bound the parts predict;
* ``policy``: the decode routing traces replayed through LRU and through the engine's policy.

    python bench/moe_offload_speed.py --out bench/results/moe_offload_speed_CARD_DATE.json
    python bench/moe_offload_speed.py --model synthetic:tiny --budgets 1 --prompt 8 --decode 4 \
        --skip check uniform machine prefill --out /tmp/x.json          # a CPU check of the harness

With ``--layers N`` below the model's depth, each budget stands for a card of that size and is
scaled to the depth by moechat.backends.benchmark.scaled_budget (the formula ``moechat bench`` uses).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3
MODEL = "synthetic:qwen3-next-80b-a3b"
PRODUCER = "bench/moe_offload_speed.py"


def peak_host_bytes() -> int | None:
    from moechat.backends.machine import peak_rss
    return peak_rss(os.getpid())


def peak_host_gb() -> float:
    return round((peak_host_bytes() or 0) / GiB, 2)


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / GiB, 2)
    return 0.0


def timed_graph(fn, iters: int = 50) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph (launch overhead excluded)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def versions() -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def machine(store) -> dict:
    """Bandwidths: pinned copies (hwprobe) and the int4 kernel reading in place / from HBM."""
    import torch

    from moechat.backends import hwprobe
    from moechat.backends.moe_offload import kernels

    out = hwprobe.measure(256, 5)
    layer = store.layers[min(store.layers)]
    gu = layer["gate_up"]
    e = store.num_experts
    dev = "cuda"
    x = torch.randn(store.hidden, device=dev, dtype=torch.bfloat16)
    slots = 64
    cache = {n: (p.data[:slots].to(dev), p.scale[:slots].to(dev)) for n, p in layer.items()}
    miss = torch.full((e,), -1, dtype=torch.int32, device=dev)
    hit = miss.clone()
    hit[:slots] = torch.arange(slots, dtype=torch.int32, device=dev)
    k = 10
    ids_hit = torch.arange(k, device=dev)
    # misses: different experts each call (no L2 reuse)
    gen = torch.Generator(device=dev).manual_seed(0)
    ids_all = torch.randperm(e, device=dev, generator=gen)
    expert_bytes = sum(p.expert_bytes for p in layer.values())

    def gemv(ids, table):
        kernels.int4_expert_gemv(x, ids, table, cache["gate_up"][0], cache["gate_up"][1], gu.data, gu.scale)

    t_hit = timed_graph(lambda: gemv(ids_hit, hit), 100)
    per_call = []
    for block in range(0, 480, k):
        per_call.append(ids_all[block % (e - k):block % (e - k) + k])

    def misses():
        for ids in per_call:
            gemv(ids, miss)
    t_miss = timed_graph(misses, 3) / len(per_call)
    gu_bytes = gu.expert_bytes * k
    out.update({
        "int4_kernel_hbm_gb_s": round(gu_bytes / t_hit / 1e9, 1),
        "int4_kernel_zero_copy_gb_s": round(gu_bytes / t_miss / 1e9, 1),
        "gate_up_10_experts_hit_us": round(t_hit * 1e6, 1), "gate_up_10_experts_miss_us": round(t_miss * 1e6, 1),
        "expert_bytes": expert_bytes,
    })
    return out


def depth(model: str, layers: int) -> tuple[str, int]:
    """``model`` cut to ``layers`` (a synthetic: spec), and the model's full depth."""
    from moechat.backends import synthetic

    spec = synthetic.parse(model)
    full = synthetic.full_layers(spec)
    return str(synthetic.Spec(spec.name, layers if layers < full else None)), full


def build(layers: int, budget: float, policy: str = "auto", context: int = 4096, dtype: str = "auto",
          model: str = MODEL, device: str = "auto", cpu_threads: int | None = None, cache_experts: int | None = None):
    """The engine exactly as the moe-offload backend loads it (MoeOffloadBackend.load: its options,
    its synthetic build, its VRAM cap), for ``model`` cut to ``layers``, with ``budget`` GiB."""
    import torch

    from moechat.backends.moe_offload import MoeOffloadBackend

    spec, _ = depth(model, layers)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    backend = MoeOffloadBackend()
    backend.load(MoeOffloadBackend.Settings(model=spec, vram_budget_gb=budget, max_context=context,
                                            miss_policy=policy, dtype=dtype, device=device,
                                            cpu_threads=cpu_threads, cache_experts=cache_experts), lambda p: None)
    eng = backend.engine
    return eng, eng.store, eng.config


def parts(eng) -> dict:
    """The resident step alone (no routed experts) and one layer's routed experts, from graphs."""
    import torch

    from moechat.backends.moe_offload.decode import Qwen3NextDecoder

    shapes = eng.adapter.shapes(eng.config)

    class NoExperts:   # the routed experts cost nothing and add nothing (one zero tensor for all layers,
        zero = torch.zeros(shapes.top_k, shapes.hidden, device="cuda", dtype=torch.float32)   # no launch)

        def experts_out(self, moe, x, ids, w=None):
            return self.zero

        def cpu_out(self, moe):
            return None

    dec = Qwen3NextDecoder(eng.model, eng.config, 1024, NoExperts(), shapes.moe_layers, fused=True)
    dec.pos.fill_(512)
    t_res = timed_graph(dec.step, 20)
    profile = resident_profile(dec, t_res)
    del dec
    de = eng.decode_path.device_experts
    x = torch.randn(shapes.hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.full((shapes.top_k,), 0.1, device="cuda", dtype=torch.bfloat16)
    mod = eng.experts[0]
    cached = torch.tensor(list(mod.lru.keys())[:shapes.top_k], device="cuda")
    uncached = torch.tensor([e for e in range(shapes.num_experts) if e not in mod.lru][:shapes.top_k], device="cuda")
    t_hit = timed_graph(lambda: de(0, x, cached, w), 100)
    t_miss = timed_graph(lambda: de(0, x, uncached, w), 30) if len(uncached) == shapes.top_k else None
    return {"resident_step_ms": round(t_res * 1e3, 2), "resident_profile": profile,
            "resident_ms_per_layer": round(t_res * 1e3 / len(eng.model.model.layers), 3),
            "routed_layer_all_hits_us": round(t_hit * 1e6, 1),
            "routed_layer_all_misses_us": round(t_miss * 1e6, 1) if t_miss else None}


def gpu_us(ev) -> float:
    """A profiler event's own GPU time in microseconds (the attribute's name changed in torch 2.4)."""
    t = getattr(ev, "self_device_time_total", None)
    return getattr(ev, "self_cuda_time_total", 0) if t is None else t


def resident_profile(dec, t_graph: float, n: int = 30) -> dict:
    """Where the resident step's time goes: its kernels (one eager step under torch.profiler),
    by GPU time, and how much of the graph's time no kernel runs (launch gaps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dec.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.step()
        torch.cuda.synchronize()
    rows = [{"name": ev.key[:80], "calls": ev.count, "gpu_us": round(gpu_us(ev), 1)}
            for ev in prof.key_averages() if gpu_us(ev) > 0]
    rows.sort(key=lambda r: -r["gpu_us"])
    busy = sum(r["gpu_us"] for r in rows)
    return {"kernels_per_step": sum(r["calls"] for r in rows), "kernel_time_ms": round(busy / 1e3, 2),
            "graph_step_ms": round(t_graph * 1e3, 2),
            "idle_between_kernels_ms": round(t_graph * 1e3 - busy / 1e3, 2), "top": rows[:n]}


def check(layers: int = 4, tokens: int = 8, dtype: str = "bfloat16", slots: int = 64,
          policies: tuple[str, ...] = ("pcie", "hybrid", "cpu"), model: str = MODEL) -> dict:
    """Teacher-forced logits of the graphed step against transformers' modules on the same
    weights, per miss policy on one engine. ``slots`` of the 512 experts per layer are cached, so
    most of each token's experts miss and cross the policy's pipe (PCIe, the CPU, or both)."""
    import torch

    from moechat.backends.moe_offload.engine import DecodePath

    eng, store, cfg = build(layers, 12.0, dtype=dtype, cache_experts=slots, model=model)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)
    follow = torch.randint(0, cfg.vocab_size, (tokens,), generator=g).tolist()
    out = {"layers": layers, "dtype": dtype, "tokens": tokens, "cache_slots_per_layer": slots, "policies": {}}
    with torch.inference_mode():
        want = []
        seq = prompt
        for t in follow:
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            want.append(eng.forward(seq, None, logits_to_keep=1)[0][0, -1].float())
        for policy in policies:
            if eng._decode is not None:
                eng._decode.close()
            eng._decode = DecodePath(eng, miss_policy=policy)
            eng.counters.reset()
            _, cache = eng.forward(prompt, None, logits_to_keep=1)
            step = eng.decode_path.start(cache, prompt.shape[1])
            got = [step(t).float().clone() for t in follow]   # the graph's output buffer is reused
            c = eng.counters
            out["policies"][policy] = {
                "decode_path": eng.decode_path.kind, "miss_policy": eng.info.get("decode_miss_policy"),
                "max_rel_logit_diff": round(max(((a - b).abs().max() / b.abs().max()).item()
                                                for a, b in zip(got, want)), 4),
                "argmax_agree": sum(int(a.argmax() == b.argmax()) for a, b in zip(got, want)),
                "experts_over_pcie": c.zero_copy_experts, "experts_on_cpu": c.cpu_experts}
    eng.decode_path.close()
    del eng, store
    return out


def run(eng, cfg, prompt: int, decode: int, warmup: int) -> dict:
    import torch

    from moechat.backends.moe_offload.engine import Sampler

    path = eng.decode_path
    c = eng.counters
    trace = []
    if path.device_experts is not None:
        original = path.device_experts.after_token

        def recording(routing):
            trace.append(routing.to("cpu"))
            original(routing)
        path.device_experts.after_token = recording
    g = torch.Generator().manual_seed(1)
    warm = torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist()
    list(eng.generate_ids(warm, Sampler(1.0, seed=0), 4, set()))        # compiles, fills the cache
    ids = torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist()
    c.reset()
    trace.clear()
    gen = eng.generate_ids(ids, Sampler(1.0, seed=1), warmup + decode + 1, set())
    next(gen)                                     # prefill and the first token
    prefill_s = c.prefill_s
    prefill_stats = (c.hits, c.misses, c.bytes_h2d)
    for _ in range(warmup):
        next(gen)
    c.reset()
    trace_start = len(trace)
    sync()
    t0 = time.perf_counter()
    for _ in range(decode):
        next(gen)
    sync()
    dec_s = time.perf_counter() - t0
    lookups = max(c.hits + c.misses, 1)
    out = {
        "prompt_tokens": prompt, "prefill_s": round(prefill_s, 3), "prefill_tok_s": round(prompt / prefill_s, 1),
        "prefill_hit_rate": round(prefill_stats[0] / max(prefill_stats[0] + prefill_stats[1], 1), 4),
        "prefill_h2d_gb": round(prefill_stats[2] / 1e9, 2),
        "decode_tokens": decode, "decode_tok_s": round(decode / dec_s, 2),
        "decode_ms_per_token": round(1000 * dec_s / decode, 2),
        "decode_hit_rate": round(c.hits / lookups, 4),
        "pcie_mb_per_token": round(c.bytes_h2d / decode / 1e6, 1),
        "zero_copy_experts_per_token": round(c.zero_copy_experts / decode, 2),
        "experts_swapped_per_token": round(c.copied / decode, 2),
        # the two pipes of missed experts (hybrid decode, docs/moe-offload.md)
        "decode_miss_policy": eng.info.get("decode_miss_policy"),
        "cpu_experts_per_token": round(c.cpu_experts / decode, 2),
        "hybrid_token_share": round(c.hybrid_tokens / decode, 3),
        "cpu_expert_gb_s": round(c.cpu_bytes / c.cpu_s / 1e9, 1) if c.cpu_s else None,
        "pcie_expert_gb_s": round(c.zero_copy_experts * eng.store.expert_bytes() / c.pcie_s / 1e9, 1) if c.pcie_s else None,
        "token_split_ms": {
            "gpu experts (hits + PCIe reads), from hand-over to wait": round(1e3 * c.pcie_s / decode, 2),
            "gpu waiting for the cpu": round(1e3 * c.gpu_wait_s / decode, 2),
            "cpu experts (overlapped with the gpu's)": round(1e3 * c.cpu_s / decode, 2)} if c.pcie_s else None,
        "gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GiB, 2),
        "gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GiB, 2),
        "host_rss_gb": rss_gb(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    out["_trace"] = torch.stack(trace[trace_start:]) if len(trace) > trace_start else None
    return out


def uniform_prefill():
    """A patch under which prefill routes each token to top_k distinct experts drawn uniformly
    (the router still runs): every expert of a layer is touched, as a trained model's prompt
    touches them, where the random model's router keeps to a few."""
    from unittest import mock

    import torch

    from moechat.backends.moe_offload.engine import OffloadedExperts

    plain = OffloadedExperts.forward

    def forward(self, x, top_k_index, top_k_weights):
        t, k = top_k_index.shape
        pick = torch.rand(t, self.store.num_experts, device=x.device).argsort(-1)[:, :k]
        return plain(self, x, pick, top_k_weights)
    return mock.patch.object(OffloadedExperts, "forward", forward)


def prefill_detail(eng, cfg, tokens: int, uniform: bool = False) -> dict:
    """One prompt's prefill, several ways on the same engine: the grouped path (Triton int4
    dequantization, one grouped GEMM per chunk of experts) against torch's dequantization with a
    product per expert; the model's router against uniform random routing (every expert of a
    layer touched, a trained model's case); where the time goes, per module and per kernel.
    ``uniform``: only the grouped path, and where its time goes, under uniform routing."""
    from unittest import mock

    import torch

    from moechat.backends.moe_offload import engine as E

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    c = eng.counters

    def torch_only():
        return mock.patch.multiple(E, _gpu_kernels=lambda: None), mock.patch.object(torch, "_grouped_mm", None)

    def timed(patches=(), label=""):
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            eng.forward(ids, None, logits_to_keep=1)
            torch.cuda.synchronize()
            c.reset()
            t0 = time.perf_counter()
            logits, _ = eng.forward(ids, None, logits_to_keep=1)
            torch.cuda.synchronize()
            s = time.perf_counter() - t0
        lookups = max(c.hits + c.misses, 1)
        return {"way": label, "s": round(s, 3), "tok_s": round(tokens / s, 1), "hit_rate": round(c.hits / lookups, 4),
                "h2d_gb": round(c.bytes_h2d / 1e9, 2), "experts_copied": c.copied}, logits[0, -1].float()

    out: dict = {"tokens": tokens, "ways": [], "routing": "uniform random routing" if uniform else "the model's router"}
    if uniform:
        with uniform_prefill():
            out["ways"].append(timed(label="grouped, uniform random routing")[0])
            out["modules_ms"] = module_times(eng, ids)
            out["top_kernels"] = top_kernels(eng, ids)
        return out
    rec, fast = timed(label="grouped (Triton dequant + torch._grouped_mm), the model's router")
    out["ways"].append(rec)
    rec, slow = timed(torch_only(), "torch dequant + a product per expert, the model's router")
    out["ways"].append(rec)
    out["grouped_vs_torch"] = {"max_rel_logit_diff": round(((fast - slow).abs().max() / slow.abs().max()).item(), 4),
                               "argmax_agree": bool(fast.argmax() == slow.argmax())}
    rec, _ = timed([uniform_prefill()], "grouped, uniform random routing")
    out["ways"].append(rec)
    out["modules_ms"] = module_times(eng, ids)
    out["top_kernels"] = top_kernels(eng, ids)
    return out


def module_times(eng, ids) -> dict:
    """Milliseconds per kind of module in one prefill (a sync before and after each)."""
    import torch

    spent: dict[str, float] = {}
    handles = []
    kinds = {"linear_attn": "gated DeltaNet", "self_attn": "attention", "experts": "routed experts",
             "shared_expert": "shared expert", "gate": "router"}
    for layer in eng.model.model.layers:
        for name, mod in layer.named_modules():
            kind = kinds.get(name.rsplit(".", 1)[-1])
            if kind is None:
                continue

            def pre(_m, _a, kind=kind):
                torch.cuda.synchronize()
                spent[kind] = spent.get(kind, 0.0) - time.perf_counter()

            def post(_m, _a, _o, kind=kind):
                torch.cuda.synchronize()
                spent[kind] += time.perf_counter()
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.forward(ids, None, logits_to_keep=1)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    out = {k: round(v * 1e3, 1) for k, v in spent.items()}
    out["everything else"] = round((total - sum(spent.values())) * 1e3, 1)
    out["total (with the syncs)"] = round(total * 1e3, 1)
    return out


def top_kernels(eng, ids, n: int = 15) -> list[dict]:
    """The kernels and ops that took most GPU time in one prefill (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.forward(ids, None, logits_to_keep=1)
        torch.cuda.synchronize()
    rows = [{"name": ev.key[:90], "calls": ev.count, "self_gpu_ms": round(gpu_us(ev) / 1e3, 2),
             "self_cpu_ms": round(ev.self_cpu_time_total / 1e3, 2)} for ev in prof.key_averages()]
    by_gpu = sorted(rows, key=lambda r: -r["self_gpu_ms"])[:n]
    by_cpu = [r for r in sorted(rows, key=lambda r: -r["self_cpu_ms"])[:n] if r not in by_gpu]
    return by_gpu + by_cpu


def one_run(args) -> dict:
    """One budget and routing in this process (each run gets a fresh process: clean peaks)."""
    from moechat.backends.moe_offload.cache import simulate
    from moechat.backends.moe_offload.engine import DecodePath

    from moechat.backends import benchmark, synthetic

    spec, full = depth(args.model, args.layers)
    applied = benchmark.scaled_budget(args.budget, synthetic.model_info(spec), args.layers, full)
    t0 = time.perf_counter()
    eng, store, cfg = build(args.layers, applied, model=args.model, device=args.device, policy=args.miss_policy,
                            cpu_threads=args.cpu_threads)
    rec = {"vram_budget_gb": args.budget, "vram_budget_applied_gb": round(applied, 3), "layers": args.layers,
           "full_layers": full, "model": spec,
           "routing": "uniform random (forced)" if args.uniform else "the random model's router",
           "cache_slots_per_layer": eng.info["cache_slots_per_layer"],
           "cache_share": round(eng.info["cache_slots_per_layer"] / store.num_experts, 3),
           "resident_gb": eng.info["resident_gb"], "experts_host_gb": round(store.total_bytes() / 1e9, 2),
           "build_s": round(time.perf_counter() - t0, 1)}
    if args.no_prefill_stream:    # the cache's path for every prompt (a stream that never pays)
        from moechat.backends.moe_offload.engine import DEQUANT_CHUNK
        from moechat.backends.moe_offload.prefill import PrefillStream
        eng.stream_prefill(PrefillStream([], 0, DEQUANT_CHUNK))
    rec["prefill_stream"] = "off" if args.no_prefill_stream else "on"
    if args.uniform:    # the step is captured with the switch on
        eng._decode = DecodePath(eng, uniform_routing=True)
        eng.info["decode_path"] = eng._decode.kind
    rec["miss_policy"] = args.miss_policy
    rec["cpu_threads"] = args.cpu_threads
    path = eng.decode_path
    rec["decode_path"] = path.kind + (f" ({path.note})" if path.note else "")
    if args.machine:
        rec["machine"] = machine(store)
    with uniform_prefill() if args.uniform else contextlib.nullcontext():
        r = run(eng, cfg, args.prompt, args.decode, args.warmup)
    trace = r.pop("_trace")
    rec.update(r)
    if args.parts:
        rec["parts"] = parts(eng)
    if args.prefill_detail:
        rec["prefill_detail"] = prefill_detail(eng, cfg, args.prompt, uniform=args.uniform)
    if trace is not None:
        rec["policy"] = [simulate(trace, store.num_experts, eng.info["cache_slots_per_layer"], p)
                         for p in ("lru", "lfu")]
    rec["host_peak_gb"] = peak_host_gb()
    rec["peak_host_bytes"] = peak_host_bytes()
    rec["engine_info"] = dict(eng.info)
    return rec


def phase(argv: list[str], timeout: int) -> dict:
    """One part of this script in its own process (clean peak-memory numbers, and a crash stays
    contained); its last JSON line is the result."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
        sys.stderr.write(p.stderr[-4000:])
        lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
        if p.returncode == 0 and lines:
            return json.loads(lines[-1])
        return {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-1500:], "partial": lines}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"error": f"timed out after {timeout} s", "partial": [ln for ln in out.splitlines() if ln.startswith("{")],
                "elapsed_s": round(time.perf_counter() - t0)}


# ---- the one benchmark schema ----------------------------------------------------------------------

MAPPED = {"vram_budget_gb", "vram_budget_applied_gb", "layers", "full_layers", "model", "prompt_tokens",
          "decode_tokens", "build_s", "prefill_tok_s", "decode_tok_s", "peak_gpu_bytes", "peak_host_bytes",
          "engine_info", "error"}


def case_of(rec: dict, args) -> dict:
    """One run of one_run (or its failure) as a case of the benchmark schema: the fields every
    benchmark has at the top, everything measured only here in ``detail``."""
    from moechat.backends import benchmark

    budget = rec.get("vram_budget_gb")
    case = {"name": f"{budget:g} GB, {rec.get('routing', '?')}", "backend": "moe-offload",
            "model": rec.get("model") or depth(args.model, args.layers)[0],
            "layers": rec.get("layers", args.layers), "full_layers": rec.get("full_layers"),
            "vram_budget_gb": budget, "vram_budget_applied_gb": rec.get("vram_budget_applied_gb"),
            "detail": {k: v for k, v in rec.items() if k not in MAPPED}}
    if rec.get("error"):
        return dict(case, error=rec["error"])
    dec, pre = rec["decode_tok_s"], rec["prefill_tok_s"]
    return dict(case, prompt_tokens=rec["prompt_tokens"], completion_tokens=rec["decode_tokens"],
                load_time_s=rec["build_s"], decode_tok_s=benchmark.one(dec), prefill_tok_s=benchmark.one(pre),
                peak_gpu_bytes=rec.get("peak_gpu_bytes"),
                peak_gpu_source="torch peak allocated" if rec.get("peak_gpu_bytes") is not None else None,
                peak_host_bytes=rec.get("peak_host_bytes"), backend_stats=rec.get("engine_info") or {},
                extrapolated=benchmark.extrapolate(dec, pre, None, rec.get("layers"), rec.get("full_layers")))


def to_result(raw: dict, args, machine_facts: dict):
    """What main() gathered, as a validated benchmark Result of kind "engine-profile"."""
    from moechat.backends import benchmark

    bandwidth = raw.get("machine") or {}
    run = benchmark.run_info("engine-profile", PRODUCER, dict(machine_facts, bandwidth=bandwidth),
                             raw.get("versions"))
    detail = {k: v for k, v in raw.items() if k not in ("runs", "machine", "versions", "note")}
    return benchmark.result(run, raw["args"], [case_of(r, args) for r in raw["runs"]],
                            notes=[raw["note"]] if raw.get("note") else [], detail=detail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["all", "check", "run"], default="all")
    ap.add_argument("--model", default=MODEL, help="a synthetic: model (default: the 80 B shapes)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24.0, 16.0], help="cards, GiB")
    ap.add_argument("--budget", type=float, default=24.0)
    ap.add_argument("--uniform", action="store_true")
    ap.add_argument("--miss-policy", choices=["auto", "hybrid", "pcie", "cpu", "copy"], default="auto",
                    help="decode's missed experts (docs/moe-offload.md); one policy per run")
    ap.add_argument("--cpu-threads", type=int, default=None, help="threads of the CPU expert kernel")
    ap.add_argument("--no-prefill-stream", action="store_true",
                    help="long prompts take the cache's path too (prefill.PrefillStream off)")
    ap.add_argument("--machine", action="store_true")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--prefill-detail", action="store_true")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--skip", nargs="*", default=[], help="any of: check router uniform machine prefill")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.phase == "check":
        print(json.dumps({"bf16": check(), "float32": check(dtype="float32")}))
        return
    if args.phase == "run":
        print(json.dumps(one_run(args)))
        return
    from moechat.backends import benchmark

    facts = benchmark.machine_facts(0)
    result: dict = {"versions": versions(),
                    "note": "Uniform random routing is forced in prefill and in decode: in those rows the prompt "
                            "touches every expert of every layer, as a trained model's prompt does.",
                    "args": {k: v for k, v in vars(args).items() if k not in ("phase", "out")}, "runs": []}
    out_path = Path(args.out) if args.out else None

    def save(last=None):
        if out_path and result["runs"]:
            benchmark.write(out_path, to_result(result, args, facts))
        if last is not None:
            print(json.dumps(last), flush=True)

    if "check" not in args.skip:
        result["check"] = phase(["--phase", "check"], 300)
        save(result["check"])
    common = ["--model", args.model, "--device", args.device, "--layers", str(args.layers), "--prompt",
              str(args.prompt), "--decode", str(args.decode), "--warmup", str(args.warmup),
              "--miss-policy", args.miss_policy] + (["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []) \
        + (["--no-prefill-stream"] if args.no_prefill_stream else [])
    for i, budget in enumerate(args.budgets):        # each budget whole before the next
        for uniform in (False, True):
            if ("uniform" if uniform else "router") in args.skip:
                continue
            first_row = i == 0 and uniform == ("router" in args.skip)     # the run's first row
            extra = ["--machine", "--parts"] if (first_row and "machine" not in args.skip) else []
            if "prefill" not in args.skip:
                extra.append("--prefill-detail")
            argv = ["--phase", "run", "--budget", str(budget), *common, *extra] + (["--uniform"] if uniform else [])
            rec = phase(argv, 260 if "--prefill-detail" in extra else 200)
            rec.setdefault("vram_budget_gb", budget)
            rec.setdefault("routing", "uniform random (forced)" if uniform else "the random model's router")
            if "machine" in rec:
                result["machine"] = rec.pop("machine")
            result["runs"].append(rec)
            save(rec)
    save()


if __name__ == "__main__":
    main()
