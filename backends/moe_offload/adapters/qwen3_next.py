"""Qwen3-Next (hybrid Gated DeltaNet + gated attention, 512 routed experts + a shared one)."""

from __future__ import annotations

import re
from typing import Any

from moechat.backends.moe_offload.adapters import Adapter


class Qwen3NextAdapter(Adapter):
    model_types = ("qwen3_next",)
    skip_re = re.compile(r"^mtp\.")   # the multi-token-prediction layer; transformers drops it too
    causal_lm = "qwen3_next.modeling_qwen3_next:Qwen3NextForCausalLM"
    rotary_embedding = "qwen3_next.modeling_qwen3_next:Qwen3NextRotaryEmbedding"
    decoder = "decode:Qwen3NextDecoder"

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
