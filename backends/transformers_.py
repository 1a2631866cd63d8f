"""The ``transformers`` backend: a model in full precision on the CPU or GPU, with accelerate's
device_map and per-device memory caps."""

from __future__ import annotations

from typing import Any

from moechat.backends.api import BackendError, Probe, Progress, ProgressCallback, probe_modules
from moechat.backends.hf_common import HFBackend, HFSettings, max_memory, model_context, pick_device, pick_dtype, weight_bytes
from moechat.backends.hookspecs import hookimpl


def load_pretrained(folder: str, progress: ProgressCallback, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    from moechat.backends import synthetic
    if synthetic.is_synthetic(folder):
        return synthetic.build_transformers_model(folder, progress, **kwargs)
    progress(Progress("Loading weights"))
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BackendError(f"transformers could not load {folder}: {exc}") from exc


class TransformersBackend(HFBackend):
    name = "transformers"
    label = "transformers: full precision, CPU or GPU"
    description = ("Hugging Face transformers with accelerate's device_map. Simple and exact; "
                   "offloaded weights cross PCIe on every token, so large models are slow.")
    Settings = HFSettings

    @classmethod
    def probe(cls, settings=None) -> Probe:
        return probe_modules("torch", "transformers", "accelerate")

    @classmethod
    def plan(cls, model, settings, machine):
        from moechat.backends.hf_plan import plan_accelerate
        return plan_accelerate(model, settings, machine)

    def load(self, settings: HFSettings, progress: ProgressCallback) -> dict[str, Any]:
        progress(Progress("Reading the tokenizer"))
        from moechat.backends.synthetic import tokenizer_folder
        self.tokenizer = self.load_tokenizer(tokenizer_folder(settings.model))
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        mm = max_memory(settings, device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device == "cuda":
            kwargs.update(device_map="auto", max_memory=mm)
        self.model = load_pretrained(settings.model, progress, **kwargs).eval()
        self.max_context = model_context(self.model.config, settings.max_context)
        return {"model_name": settings.model.rstrip("/").split("/")[-1], "device": device,
                "dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes(self.model)}


@hookimpl
def register_backends(register):
    register(TransformersBackend)
