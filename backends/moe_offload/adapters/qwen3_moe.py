"""Qwen3-MoE (plain attention, 128 routed experts): the same fused-experts call as Qwen3-Next.

This file is the whole cost of a second family: the checkpoint names match the base adapter."""

from __future__ import annotations

from typing import Any, Callable

from backends.moe_offload.adapters import Adapter, ExpertShapes


class Qwen3MoeAdapter(Adapter):
    model_types = ("qwen3_moe",)

    def shapes(self, config: Any) -> ExpertShapes:
        layers = tuple(
            i for i in range(config.num_hidden_layers)
            if i not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (i + 1) % config.decoder_sparse_step == 0
        )
        return ExpertShapes(layers, config.num_experts, config.num_experts_per_tok,
                            config.hidden_size, config.moe_intermediate_size)

    def build_resident(self, config: Any, make_experts: Callable[[int], Any]) -> Any:
        import torch
        from transformers import Qwen3MoeForCausalLM

        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(config)
        for i in self.shapes(config).moe_layers:
            model.model.layers[i].mlp.experts = make_experts(i)
        return model

    def rebuild_buffers(self, model: Any, device: Any) -> None:
        import torch
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

        with torch.device(device):
            model.model.rotary_emb = Qwen3MoeRotaryEmbedding(model.config)

    def kv_bytes_per_token(self, config: Any, dtype_bytes: int) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype_bytes
