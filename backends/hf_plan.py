"""The memory plan of the transformers-based backends (``transformers``, ``transformers-bnb4``):
accelerate's placement of the weights under its GPU and CPU caps, the KV cache, linear-attention
state and activations. ``bnb4.py`` passes the size of its 4-bit format; everything else is the
same placement. How each number is made: docs/memory-plan.md."""

from __future__ import annotations

import math
from typing import Any

from moechat.backends.api import MemoryItem, MemoryPlan
from moechat.backends.planning import (
    CUDA_CONTEXT,
    GB,
    WORKER_HOST_CPU,
    WORKER_HOST_GPU,
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


def _weights_in_memory(model: Any, s: Shapes | None, dbytes: int, packed_bytes: float | None,
                       packs_experts: bool) -> tuple[int, int]:
    """(bytes of weights as loaded, of which in the linear layers)."""
    if packed_bytes is not None and s is not None:
        per = packed_bytes
        packed = s.linear_weights
        if not packs_experts:
            packed -= s.routed_experts
        linear = int(packed * per)
        rest = (s.total - packed) * dbytes
        return linear + rest, linear
    if model.quantization:  # a quantized checkpoint is loaded as stored
        return model.weight_bytes, model.weight_bytes
    total = s.total if s is not None else model.param_count
    return total * dbytes, (s.linear_weights if s else total) * dbytes


def plan_accelerate(model: Any, settings: Any, machine: Any, *, packed_bytes: float | None = None,
                    packs_experts: bool = True) -> MemoryPlan:
    """transformers with accelerate's device_map: weights on the GPU up to the cap, the rest in
    host RAM (moved over PCIe on every forward), KV cache and activations on the GPU.

    ``packed_bytes``: bytes per weight of a 4-bit format that packs the projection matrices
    (the routed experts too when ``packs_experts``); None: every weight in the load dtype."""
    m = effective_machine(machine)
    device = setting(settings, "device", "auto")
    gpu = bool(m.gpus) and device != "cpu"
    dbytes = dtype_bytes(setting(settings, "dtype"), gpu)
    dtype_name = {4: "float32", 2: "bfloat16"}[dbytes]
    s = try_shapes(model.config) if getattr(model, "config", None) else None
    packed = packed_bytes is not None
    weights, _ = _weights_in_memory(model, s, dbytes, packed_bytes, packs_experts)
    fmt = "NF4 (4-bit) for the linear layers" if packed else (model.quantization or dtype_name)
    ctx = context(model, setting(settings, "max_context"))
    kv_tok = s.kv_bytes_per_token(dbytes) if s else 0
    kv = kv_tok * ctx
    state = s.state_bytes_per_sequence(dbytes) if s else 0
    act = s.activation_bytes(ctx, dbytes) if s else 0
    act_tok = (s.activation_bytes(ctx + 1, dbytes) - act) if s else 0

    plan = MemoryPlan(host_available=m.host_available or None)
    plan.items.append(MemoryItem("worker process (Python, torch, transformers)", "host",
                                 WORKER_HOST_GPU if gpu else WORKER_HOST_CPU))
    plan.notes.append(f"Weights as loaded: {gb(weights)} ({fmt}); context {ctx} tokens.")
    if device == "cuda" and not m.gpus:
        plan.gpu_available = 0
        plan.advice.append("device is set to cuda but no GPU was found: set device to auto or cpu.")
    if not gpu:
        plan.items.append(MemoryItem("weights", "host", weights, fmt))
        plan.items += sequence_items(ctx, kv, state, "host")
        plan.items.append(MemoryItem(f"activations (prefill of {ctx} tokens)", "host", act))
        if not plan.fits:
            _advise_host(plan, s, weights, packed, ctx, kv_tok + act_tok)
        return plan

    free = gpu_free(m) or 0
    plan.gpu_available = free
    gcap_set = setting(settings, "gpu_memory_gb")
    ccap_set = setting(settings, "cpu_memory_gb")
    if gcap_set is None and ccap_set is None:
        gcap = int(0.9 * free)                      # accelerate: 90 % of free GPU memory
        ccap = int(0.9 * (m.host_available or 0))   # and 90 % of available RAM
    else:
        gcap = int(gcap_set * GB) if gcap_set is not None else m.gpus[0].total
        ccap = int(ccap_set * GB) if ccap_set is not None else 0  # no "cpu" key: accelerate skips the CPU
    host_note = "accelerate moves them over PCIe on every forward: slow"
    if packed and s is not None:
        # accelerate places by the sizes bitsandbytes announces: linear layers 4-bit, the fused
        # experts (quantized only after loading) and the rest in the load dtype. Modules placed on
        # the CPU are not converted (llm_int8_enable_fp32_cpu_offload) and stay in that dtype.
        packed_experts = s.routed_experts if packs_experts else 0
        placed = (int((s.linear_weights - packed_experts) * packed_bytes)
                  + (s.total - s.linear_weights + packed_experts) * dbytes)
        share = min(1.0, gcap / placed) if placed else 1.0
        on_gpu = int(weights * share)
        offloaded = int((s.total * dbytes) * (1 - share))
        on_host = min(offloaded, ccap)
        nowhere = offloaded - on_host
        if share < 1:
            host_note = f"not quantized when offloaded: {dtype_name}; " + host_note
    else:
        on_gpu = min(weights, gcap)
        on_host = min(weights - on_gpu, ccap)
        nowhere = weights - on_gpu - on_host
    plan.items.append(MemoryItem("weights on the GPU", "gpu", on_gpu, fmt))
    if on_host:
        plan.items.append(MemoryItem("offloaded weights in host RAM", "host", on_host, host_note))
    plan.items += sequence_items(ctx, kv, state, "gpu")
    plan.items.append(MemoryItem(f"activations (prefill of {ctx} tokens)", "gpu", act))
    plan.items.append(MemoryItem("CUDA context and allocator slack", "gpu", CUDA_CONTEXT))
    if nowhere > 0:
        plan.items.append(MemoryItem("weights beyond gpu_memory_gb and cpu_memory_gb", "host", nowhere,
                                     "accelerate would need a disk offload folder"))
        # the caps, not the machine, are the limit here
        plan.host_available = min(plan.host_available or 0, plan.host_bytes - nowhere)
        if gcap_set is not None and ccap_set is None:
            plan.advice.append(f"Set cpu_memory_gb (about {math.ceil(nowhere / GB)}): with only gpu_memory_gb "
                               "set, the weights that do not fit on the GPU have nowhere to go.")
    if not plan.fits:
        if plan.host_available is not None and plan.host_bytes > plan.host_available:
            _advise_host(plan, s, weights, packed, ctx, 0)
        if plan.gpu_bytes > free:
            runtime = kv + state + act + CUDA_CONTEXT
            room = free - runtime
            if room > 0:
                plan.advice.append(f"Set gpu_memory_gb to {room / GB:.1f} or less to leave room for the KV "
                                   f"cache and activations.")
            best = largest_fitting_context(free - min(on_gpu, room if room > 0 else on_gpu),
                                            state + CUDA_CONTEXT + 2 * (s.vocab * 4 if s else 0),
                                            kv_tok + act_tok)
            if best and best < ctx:
                plan.advice.append(f"Lower max_context to {best} (now {ctx}).")
    return plan


def _advise_host(plan: MemoryPlan, s: Shapes | None, weights: int, packed: bool, ctx: int,
                 per_token: float) -> None:
    offloaded = sum(i.bytes for i in plan.items if i.device == "host" and "weights" in i.what)
    host_left = (plan.host_available or 0) - (plan.host_bytes - offloaded)
    if host_left <= 0 and offloaded < plan.host_bytes / 2:
        worker = next((i.bytes for i in plan.items if i.what.startswith("worker process")), 0)
        plan.advice.append(f"Free some host RAM: the worker process alone needs about {gb(worker)} and "
                           f"{gb(plan.host_available or 0)} is available; close other programs.")
        return
    what = (f"The {gb(offloaded)} of layers that do not fit on the GPU stay unquantized in host RAM "
            "(bitsandbytes does not quantize offloaded layers) and do not fit"
            if packed and plan.gpu_available else f"The weights ({gb(weights)}) do not fit")
    from moechat.backends.moe_offload import plan as moe_offload_plan

    if s is not None and moe_offload_plan.supports(s):
        int4 = moe_offload_plan.expert_bytes("int4", s.hidden, s.expert_intermediate) * s.num_experts * s.moe_layers
        plan.advice.append(f"{what}: use moe-offload with expert_format int4 "
                           f"(routed experts {gb(int4)} in host RAM, the rest on the GPU)"
                           + ("." if packed else " or transformers-bnb4 (4-bit)."))
    elif not packed:
        plan.advice.append(f"The weights ({gb(weights)}) do not fit: use transformers-bnb4 (4-bit) or a "
                           "quantized checkpoint.")
    else:
        plan.advice.append(f"The weights ({gb(weights)}) do not fit in this machine's memory even in 4-bit.")
    if per_token and host_left > 0:
        best = largest_fitting_context(host_left, 0, per_token)
        if best and best < ctx:
            plan.advice.append(f"Or lower max_context to {best} (now {ctx}).")
