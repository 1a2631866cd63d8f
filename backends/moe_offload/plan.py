"""moe-offload's memory plan, and the sizing its engine uses: one work-area constant, one expert
size, one slot computation. The plan (app process, from the config alone) and the engine (the
worker, after building the resident model) call the same functions, so "will it fit" predicts
the cache the load makes; the post-load check compares the two slot counts.

No torch import: the app plans with this module.
"""

from __future__ import annotations

import math
from typing import Any

from moechat.backends.api import BackendError, MemoryItem, MemoryPlan
from moechat.backends.planning import (
    CUDA_CONTEXT,
    WORKER_HOST_CPU,
    WORKER_HOST_GPU,
    GiB,
    context,
    dtype_bytes,
    effective_machine,
    gb,
    gpu_free,
    largest_fitting_context,
    sequence_items,
    setting,
)
from moechat.backends.shapes import Shapes, try_shapes
from moechat.backends.shapes import shapes as config_shapes

# The engine's GPU work area, kept out of the expert cache: activations of a prefill chunk,
# experts dequantized for the many-pairs path (engine.DEQUANT_CHUNK at a time), the decode
# step's static buffers and the allocator's slack. Measured at the 80 B shapes on an H100
# (docs/facts.md): torch reserved up to 1.2 GiB beyond weights, cache, KV and state.
WORKSPACE_BYTES = int(2.0 * GiB)
# Of that work area, a long prompt's ring of streamed experts (prefill.PrefillStream): about one
# layer's attention and Gated DeltaNet time of PCIe copies at a 2,048-token prompt, so the copies
# go on while the resident layers compute (256 experts at the 80 B shapes).
PREFILL_RING_BYTES = 384 * 1024**2
FP8_BLOCK = 128   # fp8 experts carry one float32 scale per 128 x 128 block


def int4_group(requested: int, hidden: int, intermediate: int) -> int:
    """The int4 group a conversion uses: ``requested`` where it divides both expert widths, else
    the largest group that divides it and both (a model narrower than the default 128, such as
    the tests' tiny ones). The plan, the synthetic build and a checkpoint's load all use this one."""
    return math.gcd(requested, hidden, intermediate)


def expert_bytes(fmt: str, hidden: int, intermediate: int, group: int = 128, dtype_bytes: int = 2,
                 zero: bool = False) -> int:
    """Bytes of one routed expert (gate [I, H], up [I, H], down [H, I]) in the store's format:
    int4 packs two weights a byte with one bf16 (or fp16) scale per ``group`` weights, and with
    ``zero`` (an asymmetric int4 checkpoint) one uint8 zero point per group too; fp8 one byte a
    weight and a float32 scale per block of each matrix (128 x 128, smaller where the matrix
    is), ``none`` the compute dtype."""
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    n = sum(r * c for r, c in shapes)
    if fmt == "int4":
        return n // 2 + 2 * n // group + (n // group if zero else 0)
    if fmt == "fp8":
        return n + 4 * sum(math.ceil(r / min(FP8_BLOCK, r)) * math.ceil(c / min(FP8_BLOCK, c)) for r, c in shapes)
    return n * dtype_bytes


def config_dict(config: Any) -> dict[str, Any]:
    return config if isinstance(config, dict) else config.to_dict()


def kv_and_state_bytes(config: Any, dtype_bytes: int, max_context: int) -> tuple[int, int]:
    """(KV cache for ``max_context`` tokens, linear-attention state of one sequence) in bytes."""
    s = config_shapes(config_dict(config))
    return s.kv_bytes_per_token(dtype_bytes) * max_context, s.state_bytes_per_sequence(dtype_bytes)


def resolve_policy(policy: str, on_gpu: bool) -> str:
    """The experts modules' policy (prefill and the eager decode step). ``auto``, ``pcie`` and
    ``hybrid`` copy misses to the GPU when there is one (the graphed decode step then reads them
    in place or hands a share to the CPU: engine.DecodePath), and compute them on the CPU
    otherwise."""
    if policy in ("auto", "pcie", "hybrid"):
        return "copy" if on_gpu else "cpu"
    return policy


def plan_slots(budget_bytes: int, resident_bytes: int, kv_bytes: int, state_bytes: int,
               expert_bytes: int, moe_layers: int, num_experts: int) -> int:
    """Cache slots per layer that fit in what the budget leaves after everything else."""
    left = budget_bytes - resident_bytes - kv_bytes - state_bytes - WORKSPACE_BYTES
    if left <= 0:
        return 0
    return max(0, min(num_experts, left // (expert_bytes * moe_layers)))


def cache_slots(*, cache_experts: int | None, budget_bytes: int | None, resident_bytes: int, kv_bytes: int,
                state_bytes: int, expert_bytes: int, moe_layers: int, num_experts: int, top_k: int,
                policy: str) -> int:
    """The device cache slots per layer a load makes: ``cache_experts`` when given, else what
    ``budget_bytes`` leaves (None: no device cache), and at least one token's experts as a
    staging area when misses are copied."""
    if cache_experts is not None:
        slots = min(cache_experts, num_experts)
    elif budget_bytes is not None:
        slots = plan_slots(budget_bytes, resident_bytes, kv_bytes, state_bytes, expert_bytes, moe_layers,
                           num_experts)
    else:
        slots = 0
    if policy == "copy" and slots < top_k:
        slots = min(top_k, num_experts)
    return slots


def supports(s: Shapes) -> bool:
    from moechat.backends.moe_offload.adapters import model_types
    return bool(s.routed_experts) and s.model_type in model_types()


def plan(model: Any, settings: Any, machine: Any) -> MemoryPlan | None:
    """Routed experts in host RAM (int4, fp8 or the checkpoint dtype), everything else on the
    GPU, KV cache and Gated DeltaNet state on the GPU, the work area, and an expert cache that
    takes what the VRAM budget leaves."""
    s = try_shapes(model.config) if getattr(model, "config", None) else None
    if s is None or not supports(s):
        return None
    m = effective_machine(machine)
    device = setting(settings, "device", "auto")
    gpu = bool(m.gpus) and device != "cpu"
    dbytes = dtype_bytes(setting(settings, "dtype"), gpu)
    fmt = setting(settings, "expert_format", "int4")
    group = int4_group(setting(settings, "int4_group_size", 128), s.hidden, s.expert_intermediate)
    zero = False
    if fmt == "int4":   # an int4 checkpoint's experts keep its group and zero points
        from moechat.backends.moe_offload.quant_config import int4_layout
        try:
            layout = int4_layout(config_dict(model.config))
        except BackendError:   # a layout moe-offload does not read: the load says so
            layout = None
        if layout is not None:
            group, zero = layout.group, layout.zero
    one_expert = expert_bytes(fmt, s.hidden, s.expert_intermediate, group, dbytes, zero)
    experts = one_expert * s.num_experts * s.moe_layers
    resident = s.resident * dbytes
    ctx = context(model, setting(settings, "max_context", 8192))
    kv_tok = s.kv_bytes_per_token(dbytes)
    kv = kv_tok * ctx
    state = s.state_bytes_per_sequence(dbytes)
    cache = setting(settings, "cache_experts")
    policy = resolve_policy(setting(settings, "miss_policy", "auto"), gpu)

    result = MemoryPlan(host_available=m.host_available or None)
    result.items.append(MemoryItem("worker process (Python, torch, transformers)", "host",
                                   WORKER_HOST_GPU if gpu else WORKER_HOST_CPU))
    result.items.append(MemoryItem("routed experts", "host", experts,
                                   f"{fmt}, {s.routed_experts / 1e9:.1f} B parameters"))
    dev = "gpu" if gpu else "host"
    result.items.append(MemoryItem("resident weights (attention, DeltaNet, router, shared experts, embeddings)",
                                   dev, resident))
    result.items += sequence_items(ctx, kv, state, dev)
    budget = None
    if gpu:
        total = m.gpus[0].total
        budget_gib = setting(settings, "vram_budget_gb")
        # as the engine sizes it: the budget, else the memory free once the worker's CUDA context exists
        budget = int(budget_gib * GiB) if budget_gib else max((gpu_free(m) or 0) - CUDA_CONTEXT, 0)
        result.gpu_available = min(budget, total)
        result.items.append(MemoryItem("work area", "gpu", WORKSPACE_BYTES))
    slots = cache_slots(cache_experts=cache, budget_bytes=budget,
                        resident_bytes=resident, kv_bytes=kv, state_bytes=state, expert_bytes=one_expert,
                        moe_layers=s.moe_layers, num_experts=s.num_experts, top_k=s.experts_per_token,
                        policy=policy)
    if cache is not None or not gpu or setting(settings, "vram_budget_gb"):
        # the free memory the worker will find is not known here; everything else is exact
        result.expect["cache_slots_per_layer"] = slots
    share = slots / s.num_experts
    if gpu or slots:
        result.items.append(MemoryItem("GPU expert cache" if gpu else "expert cache", dev,
                                       slots * one_expert * s.moe_layers,
                                       f"{slots} of {s.num_experts} experts per layer ({share:.0%})"))
    if gpu:
        result.notes.append(f"The expert cache holds {share:.0%} of the experts; with near-uniform routing "
                            f"about that share of expert uses hit it.")
        if budget > total:
            result.advice.append(f"Lower vram_budget_gb to at most {total / GiB:.1f}: the GPU has "
                                 f"{total / GiB:.1f} GiB, and the cache is sized from the budget.")
        elif result.gpu_bytes > result.gpu_available:
            fixed = resident + state + WORKSPACE_BYTES + slots * one_expert * s.moe_layers
            best = largest_fitting_context(result.gpu_available, fixed, kv_tok)
            if best and best < ctx:
                result.advice.append(f"Lower max_context to {best} (now {ctx}), or raise vram_budget_gb.")
            elif cache:
                result.advice.append("Lower cache_experts or leave it empty so the budget sizes the cache.")
            else:
                result.advice.append(f"Raise vram_budget_gb: the resident part alone needs "
                                     f"{gb(resident + kv + state + WORKSPACE_BYTES)}.")
    if result.host_available is not None and result.host_bytes > result.host_available:
        if fmt != "int4":
            int4 = expert_bytes("int4", s.hidden, s.expert_intermediate, group) * s.num_experts * s.moe_layers
            result.advice.append(f"Use expert_format int4 instead of {fmt}: the experts take {gb(int4)} as int4.")
        else:
            result.advice.append("The int4 experts do not fit in host RAM: close other programs or add RAM.")
    return result
