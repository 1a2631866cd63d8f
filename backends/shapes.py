"""What a model's config alone says about its size: parameters by part, expert sizes, and the
KV-cache and linear-attention state a sequence needs.

The one place these are computed: every backend's plan and moe-offload's engine read them here
(a test compares the parameter counts with what transformers builds). No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Layer types that keep a KV cache; everything else in ``layer_types`` is linear attention.
ATTENTION_LAYER_TYPES = ("full_attention", "attention", "sliding_attention")


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
    expert_intermediate: int        # width of one routed expert's MLP
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
        """KV cache per token: attention layers x 2 x kv_heads x head_dim x ``dtype_bytes``."""
        return int(self.kv_values_per_token * dtype_bytes)

    def state_bytes_per_sequence(self, dtype_bytes: float) -> int:
        """Linear-attention (Gated DeltaNet) state of one sequence, whatever its length: the conv
        state in ``dtype_bytes``, the recurrent state in float32 (the chunked kernels keep it so)."""
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
        return ["full_attention" if t in ATTENTION_LAYER_TYPES else "linear_attention" for t in given]
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
    if n_lin and "linear_num_key_heads" in cfg:   # Gated DeltaNet; other linear layers are not counted
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
        moe_layers=n_moe, num_experts=experts, experts_per_token=top_k, expert_intermediate=moe_i,
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
    qcfg = config.get("quantization_config") or config.get("compression_config")
    archs = config.get("architectures") or []
    return ModelInfo(
        path=path, model_type=s.model_type, architecture=archs[0] if archs else s.model_type,
        param_count=s.total, weight_bytes=s.total * per, dtype=st_dtype,
        quantization=quantization_method(qcfg), quantization_config=qcfg,
        num_layers=s.layers, num_experts=s.num_experts or None,
        experts_per_token=s.experts_per_token or None, context_length=cfg.get("max_position_embeddings"),
        shards=[], config=config,
    )
