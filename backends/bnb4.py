"""The ``transformers-bnb4`` backend: the person's original route. transformers with
bitsandbytes NF4 weights and accelerate CPU offload under GPU and CPU memory caps.

transformers 5 stores MoE experts as fused 3-D parameters that ``load_in_4bit`` skips
(bitsandbytes issue 1849), which would leave 97 % of an MoE model in 16 bits. This backend
quantizes them too, with ``bitsandbytes.nn.parametrize.replace_parameter_4bit``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moechat.backends.api import Probe, Progress, ProgressCallback, probe_modules
from moechat.backends.hf_common import HFBackend, HFSettings, max_memory, model_context, pick_device, pick_dtype, weight_bytes
from moechat.backends.hookspecs import hookimpl
from moechat.backends.transformers_ import load_pretrained

# Modules kept in 16 bits: the router and gates are tiny and sensitive, and bitsandbytes'
# CPU path fails on layers whose output is not a multiple of 32 (docs/facts.md).
SKIP_MODULES = ["lm_head", "mlp.gate", "shared_expert_gate", "in_proj_ba"]
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
NF4_BLOCK = 64   # weights per absmax


def nf4_bytes(double_quant: bool = True) -> float:
    """Bytes per weight of bitsandbytes 4-bit: half a byte plus one absmax per 64 weights (float32,
    or with double quantization 8-bit plus a float32 per 256 absmax)."""
    return 0.5 + (1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256) if double_quant else 4 / NF4_BLOCK)


class Bnb4Settings(HFSettings):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type. NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves about 0.4 bit per weight).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype the 4-bit weights are expanded to for each matmul.")
    quantize_experts: bool = Field(True, description="Quantize fused MoE expert weights too (transformers 5 leaves them in 16 bits otherwise).")


def quantize_fused_experts(model: Any, quant_type: str, double_quant: bool) -> int:
    """Replace the 3-D expert parameters of every ``*Experts`` module with 4-bit ones.
    Returns how many parameters were replaced."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    done = 0
    for module in model.modules():
        if not type(module).__name__.endswith("Experts"):
            continue
        for name in FUSED_EXPERT_PARAMS:
            param = getattr(module, name, None)
            if param is not None and getattr(param, "dim", lambda: 0)() == 3:
                replace_parameter_4bit(module, name, compress_statistics=double_quant, quant_type=quant_type)
                done += 1
    return done


class Bnb4Backend(HFBackend):
    name = "transformers-bnb4"
    label = "transformers + bitsandbytes 4-bit, CPU offload"
    description = ("NF4 weights through bitsandbytes, with accelerate placing what does not fit on the "
                   "GPU in host RAM. Runs almost anywhere; offloaded layers are slow.")
    Settings = Bnb4Settings

    @classmethod
    def probe(cls, settings=None) -> Probe:
        return probe_modules("torch", "transformers", "accelerate", "bitsandbytes")

    @classmethod
    def plan(cls, model, settings, machine):
        """Every projection and expert matrix 4-bit (``nf4_bytes``; the routed experts only when
        quantize_experts), embeddings, lm_head, router and norms in the compute dtype, placed
        like the transformers backend's."""
        from moechat.backends.hf_plan import plan_accelerate
        return plan_accelerate(model, settings, machine, packed_bytes=nf4_bytes(settings.double_quant),
                               packs_experts=settings.quantize_experts)

    def load(self, settings: Bnb4Settings, progress: ProgressCallback) -> dict[str, Any]:
        import bitsandbytes as bnb
        import torch
        from transformers import BitsAndBytesConfig

        progress(Progress("Reading the tokenizer"))
        from moechat.backends.synthetic import tokenizer_folder
        self.tokenizer = self.load_tokenizer(tokenizer_folder(settings.model))
        device = pick_device(settings.device)
        compute = getattr(torch, settings.compute_dtype)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
            bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=SKIP_MODULES, llm_int8_enable_fp32_cpu_offload=True,
        )
        kwargs: dict[str, Any] = {"quantization_config": quant, "dtype": pick_dtype(settings.dtype, device)}
        if device == "cuda":
            kwargs.update(device_map="auto", max_memory=max_memory(settings, device))
        else:
            kwargs.update(device_map="cpu")
        model = load_pretrained(settings.model, progress, **kwargs)
        replaced = 0
        if settings.quantize_experts:
            progress(Progress("Quantizing fused MoE experts to 4 bits"))
            replaced = quantize_fused_experts(model, settings.quant_type, settings.double_quant)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        self.model = model.eval()
        self.max_context = model_context(model.config, settings.max_context)
        return {"model_name": settings.model.rstrip("/").split("/")[-1], "device": device,
                "quantized_expert_params": replaced, "weight_bytes": weight_bytes(model),
                "device_map": sorted({str(d) for d in (getattr(model, "hf_device_map", {}) or {}).values()})}


@hookimpl
def register_backends(register):
    register(Bnb4Backend)
