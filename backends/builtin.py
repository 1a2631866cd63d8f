"""The built-in answer to ``suggest_backend``: it answers last, so other plugins can override it."""

from __future__ import annotations

from moechat.backends.hookspecs import hookimpl
from moechat.backends.modelinfo import ModelInfo


@hookimpl(trylast=True)
def suggest_backend(model: ModelInfo) -> str | None:
    quant = model.quantization or ""
    if model.model_type == "qwen3_next" and model.param_count > 10e9:
        return "moe-offload"
    if quant.startswith("bitsandbytes"):
        return "transformers-bnb4"
    if quant.endswith("fp8") or quant.startswith(("awq", "gptq", "compressed-tensors")):
        return "vllm"
    return "transformers"
