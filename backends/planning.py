"""Memory plans: what a load needs on the GPU and in host RAM, and whether it fits.

A plan is computed in the app process before anything loads, from the model's config (a
``ModelInfo``), the backend's settings and this machine (``Machine``). Nothing here imports torch
except ``apply_vram_budget``, which the worker calls.

The shapes come from the config alone, so a plan for an 80 B model needs no weights:
``model_from_config(config)`` builds the ``ModelInfo``. Each backend's ``plan`` classmethod
delegates to one function here: ``plan_transformers``, ``plan_bnb4``, ``plan_moe_offload``
(vLLM's plan lives with its settings in backends/vllm_.py). After a load, ``check_after_load(plan, info)`` compares the plan with what the
worker measured and returns a warning sentence when they differ a lot.

How each number is made is written down in docs/memory-plan.md.

Units: settings named ``*_gb`` are read the way the backend that owns them reads them
(accelerate's ``"16GB"`` is 10^9 bytes; moe-offload's ``vram_budget_gb`` is GiB). Sizes shown to
people are GB (10^9 bytes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from moechat.backends.api import MemoryItem, MemoryPlan

GB = 1e9
GiB = 1024**3
MiB = 1024**2

# Host memory of a worker process before any weights: Python, torch, transformers (measured on
# CPU at about 0.38 GB with the demo model, about 0.1 GB more where bitsandbytes finds triton
# installed and imports its kernels; CUDA's libraries and context add about 1.5 GB).
WORKER_HOST_CPU = int(0.6 * GB)
WORKER_HOST_GPU = int(2.0 * GB)
# GPU memory the CUDA context and the allocator's slack take before any tensor.
CUDA_CONTEXT = int(0.5 * GiB)
# moe-offload's work area on the GPU (the backend reserves the same).
MOE_OFFLOAD_WORK_AREA = int(1.5 * GiB)
# Bytes per parameter of each weight format. int4 and NF4 carry a scale per group.
NF4_BLOCK = 64
FORMAT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0 + 4 / (128 * 128)}
# Env overrides, so a plan can be tried (and tested) as if on another machine.
# Both in GiB, the way cards and DIMMs are sized (a "16 GB card" has 16 GiB).
HOST_RAM_ENV = "MOECHAT_HOST_RAM_GB"      # host RAM available
VRAM_BUDGET_ENV = "MOECHAT_VRAM_BUDGET_GB"  # GPU memory the worker may use (enforced by the worker)
# Post-load check: a difference above both of these is reported.
CHECK_RATIO = 0.25
CHECK_FLOOR = int(0.5 * GB)


def gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB"


def int4_bytes(group: int = 128) -> float:
    """Bytes per parameter of symmetric group-wise int4 with one bf16 scale per group (the
    moe-offload format; FACTS.md's 39.9 GB of routed experts)."""
    return 0.5 + 2 / group


# ---- shapes from a config ----------------------------------------------------------------------

def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


@dataclass
class Shapes:
    """Parameter counts by part, and the per-token and per-sequence state, of one config."""

    model_type: str
    hidden: int
    vocab: int
    layers: int
    attention_layers: int
    linear_layers: int
    moe_layers: int
    num_experts: int
    experts_per_token: int
    embed: int
    lm_head: int
    attention: int          # q/k/v/o projections and their norms, all attention layers
    linear_attention: int   # Gated DeltaNet: projections, conv, gates, norm
    router: int
    shared_experts: int
    routed_experts: int
    dense_mlp: int
    norms: int
    kv_values_per_token: int        # K and V values per token, all attention layers
    conv_state_values: int          # per sequence, all linear-attention layers
    recurrent_state_values: int     # per sequence, all linear-attention layers (kept in float32)
    widest_projection: int          # the widest activation per token (for the activation estimate)
    packed_linear: int = 0          # weights of the nn.Linear / expert matrices 4-bit quantization packs

    @property
    def total(self) -> int:
        return (self.embed + self.lm_head + self.attention + self.linear_attention + self.router
                + self.shared_experts + self.routed_experts + self.dense_mlp + self.norms)

    @property
    def resident(self) -> int:
        """Everything but the routed experts."""
        return self.total - self.routed_experts

    @property
    def one_expert(self) -> int:
        return self.routed_experts // max(self.num_experts * self.moe_layers, 1)

    @property
    def linear_weights(self) -> int:
        """Parameters in projection matrices that 4-bit quantization packs: not embeddings, the
        lm_head, norms, the router, the shared-expert gate, the Gated DeltaNet ``in_proj_ba``
        and conv, which bitsandbytes leaves alone or cannot pack."""
        return self.packed_linear

    def kv_bytes_per_token(self, dtype_bytes: float) -> int:
        return int(self.kv_values_per_token * dtype_bytes)

    def state_bytes_per_sequence(self, dtype_bytes: float) -> int:
        return int(self.conv_state_values * dtype_bytes + self.recurrent_state_values * 4)

    def activation_bytes(self, tokens: int, dtype_bytes: float) -> int:
        """Peak activations of one forward over ``tokens`` tokens: a few hidden-size copies, the
        widest projection output three times, router scores in float32, and one row of logits in
        float32. An estimate, not a measurement (see docs/memory-plan.md)."""
        per_token = (4 * self.hidden + 3 * self.widest_projection) * dtype_bytes + self.num_experts * 4
        return int(tokens * per_token + 2 * self.vocab * 4)


def layer_types(cfg: dict[str, Any]) -> list[str]:
    n = cfg["num_hidden_layers"]
    given = cfg.get("layer_types")
    if given and len(given) == n:
        return ["full_attention" if t in ("full_attention", "attention", "sliding_attention") else "linear_attention"
                for t in given]
    if cfg.get("model_type") == "qwen3_next":
        interval = cfg.get("full_attention_interval", 4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    return ["full_attention"] * n


def shapes(config: dict[str, Any]) -> Shapes:
    """Parameter counts of a transformers decoder from its config: qwen3_next, qwen3_moe,
    qwen2_moe, mixtral, olmoe and dense llama-style models. Others raise KeyError/ValueError."""
    cfg = text_config(config)
    mt = cfg.get("model_type", config.get("model_type", ""))
    h = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    n = cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    types = layer_types(dict(cfg, model_type=mt))
    n_attn = types.count("full_attention")
    n_lin = n - n_attn

    gated_q = 2 if mt == "qwen3_next" else 1
    attn_one = h * nh * hd * gated_q + 2 * h * kvh * hd + nh * hd * h
    attn_packed = attn_one
    if cfg.get("attention_bias") or mt in ("qwen2", "qwen2_moe"):
        attn_one += nh * hd * gated_q + 2 * kvh * hd
        if cfg.get("attention_bias") and mt not in ("qwen2", "qwen2_moe"):
            attn_one += h  # o_proj bias
    if mt in ("qwen3", "qwen3_moe", "qwen3_next", "olmoe"):
        attn_one += 2 * hd if mt != "olmoe" else h + kvh * hd

    lin_one = lin_packed = conv_values = rec_values = 0
    widest = max(nh * hd * gated_q, cfg.get("intermediate_size") or 0)
    if n_lin:
        kd = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
        vheads = cfg["linear_num_value_heads"]
        vd = vheads * cfg["linear_value_head_dim"]
        conv_dim = 2 * kd + vd
        k = cfg["linear_conv_kernel_dim"]
        lin_one = (h * (2 * kd + 2 * vd) + h * 2 * vheads + conv_dim * k + 2 * vheads
                   + cfg["linear_value_head_dim"] + vd * h)
        lin_packed = h * (2 * kd + 2 * vd) + vd * h
        conv_values = conv_dim * k
        rec_values = vheads * cfg["linear_key_head_dim"] * cfg["linear_value_head_dim"]
        widest = max(widest, 2 * kd + 2 * vd)

    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    top_k = cfg.get("num_experts_per_tok") or 0
    moe_i = cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if mt == "mixtral" else 0)
    shared_i = cfg.get("shared_expert_intermediate_size") or 0
    sparse = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    moe_layers = [i for i in range(n) if experts and i not in mlp_only and (i + 1) % sparse == 0]
    n_moe = len(moe_layers)
    dense_layers = n - n_moe
    widest = max(widest, 2 * top_k * moe_i, 2 * shared_i)

    return Shapes(
        model_type=mt, hidden=h, vocab=vocab, layers=n, attention_layers=n_attn, linear_layers=n_lin,
        moe_layers=n_moe, num_experts=experts, experts_per_token=top_k,
        embed=vocab * h,
        lm_head=0 if cfg.get("tie_word_embeddings") else vocab * h,
        attention=n_attn * attn_one,
        linear_attention=n_lin * lin_one,
        router=n_moe * experts * h,
        shared_experts=n_moe * (3 * h * shared_i + (h if shared_i else 0)),
        routed_experts=n_moe * experts * 3 * h * moe_i,
        dense_mlp=dense_layers * 3 * h * cfg.get("intermediate_size", 0),
        norms=(2 * n + 1) * h,
        kv_values_per_token=n_attn * 2 * kvh * hd,
        conv_state_values=n_lin * conv_values,
        recurrent_state_values=n_lin * rec_values,
        widest_projection=widest,
        packed_linear=(n_attn * attn_packed + n_lin * lin_packed + n_moe * 3 * h * shared_i
                       + n_moe * experts * 3 * h * moe_i + dense_layers * 3 * h * cfg.get("intermediate_size", 0)),
    )


def try_shapes(config: dict[str, Any]) -> Shapes | None:
    try:
        return shapes(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def model_from_config(config: dict[str, Any], path: str = "", dtype: str | None = None) -> Any:
    """A ``ModelInfo`` for a model that exists only as a config (an 80 B plan without the weights,
    or a synthetic model). Weight bytes are the parameters in the config's dtype."""
    from moechat.backends.modelinfo import ModelInfo, quantization_method

    s = shapes(config)
    cfg = text_config(config)
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    st_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, "BF16")
    per = {"BF16": 2, "F16": 2, "F32": 4}[st_dtype]
    qcfg = config.get("quantization_config")
    archs = config.get("architectures") or []
    return ModelInfo(
        path=path, model_type=s.model_type, architecture=archs[0] if archs else s.model_type,
        param_count=s.total, weight_bytes=s.total * per, dtype=st_dtype,
        quantization=quantization_method(qcfg), quantization_config=qcfg,
        num_layers=s.layers, num_experts=s.num_experts or None,
        experts_per_token=s.experts_per_token or None, context_length=cfg.get("max_position_embeddings"),
        shards=[], config=config,
    )


# ---- the machine, as plans see it --------------------------------------------------------------

def effective_machine(machine: Any) -> Any:
    """``machine`` with the test/bench overrides applied: ``MOECHAT_HOST_RAM_GB`` sets the host
    RAM available, ``MOECHAT_VRAM_BUDGET_GB`` caps every GPU (as the worker enforces it)."""
    if machine is None:
        from moechat.backends.machine import Machine
        machine = Machine()
    ram = os.environ.get(HOST_RAM_ENV)
    if ram:
        machine = replace(machine, host_available=int(float(ram) * GiB), host_total=int(float(ram) * GiB))
    budget = os.environ.get(VRAM_BUDGET_ENV)
    if budget and machine.gpus:
        cap = int(float(budget) * GiB)
        machine = replace(machine, gpus=[replace(g, total=min(g.total, cap), used=0) for g in machine.gpus])
    return machine


def gpu_free(machine: Any) -> int | None:
    if not machine.gpus:
        return None
    g = machine.gpus[0]
    return max(g.total - g.used, 0)


def _setting(settings: Any, name: str, default: Any = None) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else value


def _dtype_bytes(setting: str | None, gpu: bool) -> int:
    if setting in (None, "", "auto"):
        return 2 if gpu else 4
    return 4 if setting == "float32" else 2


def _context(model: Any, setting: int | None, default: int | None = None) -> int:
    own = model.context_length or default or 4096
    return min(setting, own) if setting else own


def _shapes_or_none(model: Any) -> Shapes | None:
    return try_shapes(model.config) if getattr(model, "config", None) else None


def _largest_fitting_context(budget: int, fixed: int, per_token: float) -> int:
    if per_token <= 0 or budget <= fixed:
        return 0
    n = int((budget - fixed) / per_token)
    return 1 << (n.bit_length() - 1) if n >= 16 else 0


# ---- transformers and transformers-bnb4 --------------------------------------------------------

def nf4_bytes(double_quant: bool = True) -> float:
    """Bytes per weight of bitsandbytes 4-bit: half a byte plus one absmax per 64 weights (float32,
    or with double quantization 8-bit plus a float32 per 256 absmax)."""
    return 0.5 + (1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256) if double_quant else 4 / NF4_BLOCK)


def _weights_in_memory(model: Any, s: Shapes | None, dtype_bytes: int, quant: str | None,
                       settings: Any = None) -> tuple[int, int]:
    """(bytes of weights as loaded, of which in the linear layers)."""
    if quant == "nf4" and s is not None:
        per = nf4_bytes(bool(_setting(settings, "double_quant", True)))
        packed = s.linear_weights
        if not _setting(settings, "quantize_experts", True):
            packed -= s.routed_experts
        linear = int(packed * per)
        rest = (s.total - packed) * dtype_bytes
        return linear + rest, linear
    if model.quantization:  # a quantized checkpoint is loaded as stored
        return model.weight_bytes, model.weight_bytes
    total = s.total if s is not None else model.param_count
    return total * dtype_bytes, (s.linear_weights if s else total) * dtype_bytes


def plan_transformers(model: Any, settings: Any, machine: Any, *, quant: str | None = None,
                      backend: str = "transformers") -> MemoryPlan:
    """transformers with accelerate's device_map: weights on the GPU up to the cap, the rest in
    host RAM (moved over PCIe on every forward), KV cache and activations on the GPU."""
    m = effective_machine(machine)
    device = _setting(settings, "device", "auto")
    gpu = bool(m.gpus) and device != "cpu"
    dtype_bytes = _dtype_bytes(_setting(settings, "dtype"), gpu)
    dtype_name = {4: "float32", 2: "bfloat16"}[dtype_bytes]
    s = _shapes_or_none(model)
    weights, _ = _weights_in_memory(model, s, dtype_bytes, quant, settings)
    fmt = "NF4 (4-bit) for the linear layers" if quant == "nf4" else (model.quantization or dtype_name)
    ctx = _context(model, _setting(settings, "max_context"))
    kv_tok = s.kv_bytes_per_token(dtype_bytes) if s else 0
    kv = kv_tok * ctx
    state = s.state_bytes_per_sequence(dtype_bytes) if s else 0
    act = s.activation_bytes(ctx, dtype_bytes) if s else 0
    act_tok = (s.activation_bytes(ctx + 1, dtype_bytes) - act) if s else 0

    plan = MemoryPlan(host_available=m.host_available or None)
    plan.items.append(MemoryItem("worker process (Python, torch, transformers)", "host",
                                 WORKER_HOST_GPU if gpu else WORKER_HOST_CPU))
    plan.notes.append(f"Weights as loaded: {gb(weights)} ({fmt}); context {ctx} tokens.")
    if device == "cuda" and not m.gpus:
        plan.gpu_available = 0
        plan.advice.append("device is set to cuda but no GPU was found: set device to auto or cpu.")
    if not gpu:
        plan.items.append(MemoryItem("weights", "host", weights, fmt))
        if kv:
            plan.items.append(MemoryItem(f"KV cache for {ctx} tokens (attention layers)", "host", kv))
        if state:
            plan.items.append(MemoryItem("Gated DeltaNet state (one sequence)", "host", state))
        plan.items.append(MemoryItem(f"activations (prefill of {ctx} tokens)", "host", act))
        if not plan.fits:
            _advise_host(plan, model, s, weights, backend, quant, ctx, kv_tok + act_tok)
        return plan

    free = gpu_free(m) or 0
    plan.gpu_available = free
    gcap_set = _setting(settings, "gpu_memory_gb")
    ccap_set = _setting(settings, "cpu_memory_gb")
    if gcap_set is None and ccap_set is None:
        gcap = int(0.9 * free)                      # accelerate: 90 % of free GPU memory
        ccap = int(0.9 * (m.host_available or 0))   # and 90 % of available RAM
    else:
        gcap = int(gcap_set * GB) if gcap_set is not None else m.gpus[0].total
        ccap = int(ccap_set * GB) if ccap_set is not None else 0  # no "cpu" key: accelerate skips the CPU
    host_note = "accelerate moves them over PCIe on every forward: slow"
    if quant == "nf4" and s is not None:
        # accelerate places by the sizes bitsandbytes announces: linear layers 4-bit, the fused
        # experts (quantized only after loading) and the rest in the load dtype. Modules placed on
        # the CPU are not converted (llm_int8_enable_fp32_cpu_offload) and stay in that dtype.
        packed_experts = s.routed_experts if _setting(settings, "quantize_experts", True) else 0
        per = nf4_bytes(bool(_setting(settings, "double_quant", True)))
        placed = int((s.linear_weights - packed_experts) * per) + (s.total - s.linear_weights + packed_experts) * dtype_bytes
        share = min(1.0, gcap / placed) if placed else 1.0
        on_gpu = int(weights * share)
        offloaded = int((s.total * dtype_bytes) * (1 - share))
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
    if kv:
        plan.items.append(MemoryItem(f"KV cache for {ctx} tokens (attention layers)", "gpu", kv))
    if state:
        plan.items.append(MemoryItem("Gated DeltaNet state (one sequence)", "gpu", state))
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
            _advise_host(plan, model, s, weights, backend, quant, ctx, 0)
        if plan.gpu_bytes > free:
            runtime = kv + state + act + CUDA_CONTEXT
            room = free - runtime
            if room > 0:
                plan.advice.append(f"Set gpu_memory_gb to {room / GB:.1f} or less to leave room for the KV "
                                   f"cache and activations.")
            best = _largest_fitting_context(free - min(on_gpu, room if room > 0 else on_gpu),
                                            state + CUDA_CONTEXT + 2 * (s.vocab * 4 if s else 0),
                                            kv_tok + act_tok)
            if best and best < ctx:
                plan.advice.append(f"Lower max_context to {best} (now {ctx}).")
    return plan


def _advise_host(plan: MemoryPlan, model: Any, s: Shapes | None, weights: int, backend: str,
                 quant: str | None, ctx: int, per_token: float) -> None:
    offloaded = sum(i.bytes for i in plan.items if i.device == "host" and "weights" in i.what)
    host_left = (plan.host_available or 0) - (plan.host_bytes - offloaded)
    if host_left <= 0 and offloaded < plan.host_bytes / 2:
        worker = next((i.bytes for i in plan.items if i.what.startswith("worker process")), 0)
        plan.advice.append(f"Free some host RAM: the worker process alone needs about {gb(worker)} and "
                           f"{gb(plan.host_available or 0)} is available; close other programs.")
        return
    what = (f"The {gb(offloaded)} of layers that do not fit on the GPU stay unquantized in host RAM "
            "(bitsandbytes does not quantize offloaded layers) and do not fit"
            if quant == "nf4" and plan.gpu_available else f"The weights ({gb(weights)}) do not fit")
    if s is not None and s.routed_experts and s.model_type in ("qwen3_next", "qwen3_moe"):
        int4 = int(s.routed_experts * int4_bytes())
        plan.advice.append(f"{what}: use moe-offload with expert_format int4 "
                           f"(routed experts {gb(int4)} in host RAM, the rest on the GPU)"
                           + ("." if quant == "nf4" else " or transformers-bnb4 (4-bit)."))
    elif quant != "nf4":
        plan.advice.append(f"The weights ({gb(weights)}) do not fit: use transformers-bnb4 (4-bit) or a "
                           "quantized checkpoint.")
    else:
        plan.advice.append(f"The weights ({gb(weights)}) do not fit in this machine's memory even in 4-bit.")
    if per_token and host_left > 0:
        best = _largest_fitting_context(host_left, 0, per_token)
        if best and best < ctx:
            plan.advice.append(f"Or lower max_context to {best} (now {ctx}).")


def plan_bnb4(model: Any, settings: Any, machine: Any) -> MemoryPlan:
    """transformers-bnb4: every linear layer, routed experts included (unless quantize_experts is
    off), as 4-bit (``nf4_bytes``), embeddings, lm_head, router and norms in the compute dtype;
    placed like ``plan_transformers``."""
    return plan_transformers(model, settings, machine, quant="nf4", backend="transformers-bnb4")


# ---- moe-offload -------------------------------------------------------------------------------

def plan_moe_offload(model: Any, settings: Any, machine: Any) -> MemoryPlan | None:
    """moe-offload: routed experts in host RAM (int4, fp8 or the checkpoint dtype), everything
    else on the GPU, KV cache and Gated DeltaNet state on the GPU, a 1.5 GiB work area, and an
    expert cache that takes what the VRAM budget leaves."""
    s = _shapes_or_none(model)
    if s is None or not s.routed_experts or s.model_type not in ("qwen3_next", "qwen3_moe"):
        return None
    m = effective_machine(machine)
    device = _setting(settings, "device", "auto")
    gpu = bool(m.gpus) and device != "cpu"
    dtype_bytes = _dtype_bytes(_setting(settings, "dtype"), gpu)
    fmt = _setting(settings, "expert_format", "int4")
    group = _setting(settings, "int4_group_size", 128)
    per_param = {"int4": int4_bytes(group), "fp8": FORMAT_BYTES["fp8"]}.get(fmt, float(dtype_bytes))
    experts = int(s.routed_experts * per_param)
    one_expert = int(s.one_expert * per_param)
    resident = s.resident * dtype_bytes
    ctx = _context(model, _setting(settings, "max_context", 8192))
    kv_tok = s.kv_bytes_per_token(dtype_bytes)
    kv = kv_tok * ctx
    state = s.state_bytes_per_sequence(dtype_bytes)

    plan = MemoryPlan(host_available=m.host_available or None)
    plan.items.append(MemoryItem("worker process (Python, torch, transformers)", "host",
                                 WORKER_HOST_GPU if gpu else WORKER_HOST_CPU))
    plan.items.append(MemoryItem("routed experts", "host", experts,
                                 f"{fmt}, {s.routed_experts / 1e9:.1f} B parameters"))
    dev = "gpu" if gpu else "host"
    plan.items.append(MemoryItem("resident weights (attention, DeltaNet, router, shared experts, embeddings)",
                                 dev, resident))
    plan.items.append(MemoryItem(f"KV cache for {ctx} tokens (attention layers)", dev, kv))
    if state:
        plan.items.append(MemoryItem("Gated DeltaNet state (one sequence)", dev, state))
    if gpu:
        total = m.gpus[0].total
        budget_gib = _setting(settings, "vram_budget_gb")
        budget = min(int(budget_gib * GiB), total) if budget_gib else (gpu_free(m) or 0)
        plan.gpu_available = budget
        plan.items.append(MemoryItem("work area", "gpu", MOE_OFFLOAD_WORK_AREA))
        left = budget - resident - kv - state - MOE_OFFLOAD_WORK_AREA
        cache = _setting(settings, "cache_experts")
        slots = cache if cache is not None else max(0, min(s.num_experts, left // max(one_expert * s.moe_layers, 1)))
        if _setting(settings, "miss_policy", "auto") in ("auto", "copy") and slots < s.experts_per_token:
            slots = min(s.experts_per_token, s.num_experts)  # a staging area for one token's experts
        share = slots / s.num_experts
        plan.items.append(MemoryItem("GPU expert cache", "gpu", slots * one_expert * s.moe_layers,
                                     f"{slots} of {s.num_experts} experts per layer ({share:.0%})"))
        plan.notes.append(f"The expert cache holds {share:.0%} of the experts; with near-uniform routing "
                          f"about that share of expert uses hit it.")
        if plan.gpu_bytes > budget:
            fixed = resident + state + MOE_OFFLOAD_WORK_AREA + slots * one_expert * s.moe_layers
            best = _largest_fitting_context(budget, fixed, kv_tok)
            if best and best < ctx:
                plan.advice.append(f"Lower max_context to {best} (now {ctx}), or raise vram_budget_gb.")
            elif cache:
                plan.advice.append("Lower cache_experts or leave it empty so the budget sizes the cache.")
            else:
                plan.advice.append(f"Raise vram_budget_gb: the resident part alone needs "
                                   f"{gb(resident + kv + state + MOE_OFFLOAD_WORK_AREA)}.")
    if plan.host_available is not None and plan.host_bytes > plan.host_available:
        if fmt != "int4":
            plan.advice.append(f"Use expert_format int4 instead of {fmt}: the experts take "
                               f"{gb(s.routed_experts * int4_bytes(group))} as int4.")
        else:
            plan.advice.append("The int4 experts do not fit in host RAM: close other programs or add RAM.")
    return plan


# ---- showing and checking ----------------------------------------------------------------------

def describe(plan: MemoryPlan) -> str:
    """One paragraph a person can act on: what is needed, what there is, what to change."""
    parts = []
    if plan.gpu_available is not None:
        parts.append(f"GPU: needs {gb(plan.gpu_bytes)} of {gb(plan.gpu_available)} available")
    elif plan.gpu_bytes:
        parts.append(f"GPU: needs {gb(plan.gpu_bytes)} but no GPU was found")
    if plan.host_available is not None:
        parts.append(f"host RAM: needs {gb(plan.host_bytes)} of {gb(plan.host_available)} available")
    verdict = "This fits." if plan.fits else "This does not fit."
    text = f"{verdict} " + "; ".join(parts) + "."
    if not plan.fits and plan.advice:
        text += " " + " ".join(plan.advice)
    return text


def table(plan: MemoryPlan) -> str:
    """The plan as lines of text: one line per item, then the totals and the verdict."""
    lines = []
    for item in plan.items:
        note = f"  ({item.note})" if item.note else ""
        lines.append(f"{item.device:<4} {gb(item.bytes):>10}  {item.what}{note}")
    lines.append(describe(plan))
    lines.extend(plan.notes)
    return "\n".join(lines)


def markdown(plan: MemoryPlan) -> str:
    """The plan as a Markdown table and its verdict, for the web page."""
    rows = ["| where | size | what |", "|---|---:|---|"]
    for item in plan.items:
        note = f" ({item.note})" if item.note else ""
        rows.append(f"| {'GPU' if item.device == 'gpu' else 'RAM'} | {gb(item.bytes)} | {item.what}{note} |")
    return "\n".join(rows + ["", ("**" + describe(plan) + "**") if not plan.fits else describe(plan)]
                     + [f"- {n}" for n in plan.notes])


def to_dict(plan: MemoryPlan) -> dict[str, Any]:
    return {"fits": plan.fits, "gpu_bytes": plan.gpu_bytes, "host_bytes": plan.host_bytes,
            "gpu_available": plan.gpu_available, "host_available": plan.host_available,
            "items": [{"what": i.what, "device": i.device, "bytes": i.bytes, "note": i.note} for i in plan.items],
            "advice": list(plan.advice), "notes": list(plan.notes), "summary": describe(plan)}


def _is_weights(item: MemoryItem) -> bool:
    w = item.what.lower()
    return ("weights" in w or w.startswith("routed experts")) and "beyond" not in w


def check_after_load(plan: MemoryPlan | None, info: dict[str, Any]) -> str | None:
    """Compare ``plan`` with what the worker measured after loading (``info``: ``weight_bytes``
    by device type, ``worker_rss_bytes``, ``gpus``). Returns a sentence when weights ended up
    somewhere else than planned or the worker uses far more memory than planned; else None.
    A difference counts when it is above 25 % and above 0.5 GB."""
    if plan is None:
        return None
    problems = []
    measured = info.get("weight_bytes")
    if isinstance(measured, dict) and measured:
        planned_gpu = sum(i.bytes for i in plan.items if i.device == "gpu" and _is_weights(i))
        planned_host = sum(i.bytes for i in plan.items if i.device == "host" and _is_weights(i))
        got_gpu = sum(v for k, v in measured.items() if k in ("cuda", "gpu"))
        # accelerate keeps offloaded weights in host RAM and leaves "meta" parameters in the model
        got_host = sum(v for k, v in measured.items() if k in ("cpu", "meta"))
        if _differs(got_gpu, planned_gpu):
            problems.append(f"{gb(got_gpu)} of weights are on the GPU where the plan put {gb(planned_gpu)}")
        if _differs(got_host, planned_host):
            what = " (offload did not happen as planned)" if got_host < planned_host and got_gpu > planned_gpu else ""
            problems.append(f"{gb(got_host)} of weights are in host RAM where the plan put {gb(planned_host)}{what}")
    rss = info.get("worker_rss_bytes")
    if isinstance(rss, int) and rss > plan.host_bytes and _differs(rss, plan.host_bytes):
        problems.append(f"the worker uses {gb(rss)} of host RAM where the plan expected at most {gb(plan.host_bytes)}")
    gpus = info.get("gpus") or []
    if gpus and plan.gpu_available is not None:
        used = max((g.get("allocated_bytes") or 0) for g in gpus)
        if used > plan.gpu_bytes and _differs(used, plan.gpu_bytes):
            problems.append(f"torch holds {gb(used)} on the GPU where the plan expected at most {gb(plan.gpu_bytes)}")
    if not problems:
        return None
    return ("Measured memory differs from the plan: " + "; ".join(problems)
            + ". Check the settings; the plan's numbers may not hold for this model.")


def _differs(measured: int, planned: int) -> bool:
    gap = abs(measured - planned)
    return gap > CHECK_FLOOR and gap > CHECK_RATIO * max(planned, 1)


# ---- enforcing a VRAM budget (in the worker) ---------------------------------------------------

def apply_vram_budget(budget_gb: float) -> float | None:
    """Cap this process's CUDA allocations at ``budget_gb`` GiB (torch's per-process memory
    fraction: an allocation beyond it raises out-of-memory). Returns the fraction, or None
    without CUDA. Called by the worker when MOECHAT_VRAM_BUDGET_GB is set."""
    import torch
    if not torch.cuda.is_available():
        return None
    fraction = None
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        fraction = min(1.0, budget_gb * GiB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, i)
    return fraction
