"""Qwen3-Next (hybrid Gated DeltaNet + gated attention, 512 routed experts + a shared one)."""

from __future__ import annotations

import re
from moechat.backends.moe_offload.adapters import Adapter


class Qwen3NextAdapter(Adapter):
    model_types = ("qwen3_next",)
    skip_re = re.compile(r"^mtp\.")   # the multi-token-prediction layer; transformers drops it too
    causal_lm = "qwen3_next.modeling_qwen3_next:Qwen3NextForCausalLM"
    rotary_embedding = "qwen3_next.modeling_qwen3_next:Qwen3NextRotaryEmbedding"
    decoder = "decode:Qwen3NextDecoder"
