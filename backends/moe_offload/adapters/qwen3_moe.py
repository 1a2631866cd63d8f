"""Qwen3-MoE (plain attention, 128 routed experts): the same fused-experts call as Qwen3-Next.

This file is the whole cost of a second family: the checkpoint names match the base adapter."""

from __future__ import annotations

from moechat.backends.moe_offload.adapters import Adapter


class Qwen3MoeAdapter(Adapter):
    model_types = ("qwen3_moe",)
    causal_lm = "qwen3_moe.modeling_qwen3_moe:Qwen3MoeForCausalLM"
    rotary_embedding = "qwen3_moe.modeling_qwen3_moe:Qwen3MoeRotaryEmbedding"
