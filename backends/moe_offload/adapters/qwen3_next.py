"""Qwen3-Next (hybrid Gated DeltaNet + gated attention, 512 routed experts + a shared one)."""

from __future__ import annotations

import re
from typing import Any, Callable

from backends.moe_offload.adapters import Adapter, ExpertShapes


class Qwen3NextAdapter(Adapter):
    model_types = ("qwen3_next",)
    skip_re = re.compile(r"^mtp\.")   # the multi-token-prediction layer; transformers drops it too

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
        from transformers import Qwen3NextForCausalLM

        with torch.device("meta"):
            model = Qwen3NextForCausalLM(config)
        for i in self.shapes(config).moe_layers:
            model.model.layers[i].mlp.experts = make_experts(i)
        return model

    def rebuild_buffers(self, model: Any, device: Any) -> None:
        import torch
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

        with torch.device(device):
            model.model.rotary_emb = Qwen3NextRotaryEmbedding(model.config)

    def kv_bytes_per_token(self, config: Any, dtype_bytes: int) -> int:
        attn_layers = sum(1 for t in config.layer_types if t == "full_attention")
        return attn_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes

    def state_bytes(self, config: Any, dtype_bytes: int) -> int:
        gdn = sum(1 for t in config.layer_types if t == "linear_attention")
        k, v = config.linear_key_head_dim, config.linear_value_head_dim
        nv, nk = config.linear_num_value_heads, config.linear_num_key_heads
        conv_dim = 2 * k * nk + v * nv
        recurrent = nv * k * v * 4          # kept in float32 by the chunked kernels
        conv = conv_dim * config.linear_conv_kernel_dim * dtype_bytes
        return gdn * (recurrent + conv)
