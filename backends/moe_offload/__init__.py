"""The ``moe-offload`` backend: a huge mixture-of-experts model on one ordinary GPU.

Everything but the routed experts lives on the GPU; routed experts live in (pinned) host memory
as int4 or fp8, with a per-layer GPU cache of recently used experts sized from a VRAM budget.
Misses are copied over PCIe or computed on the CPU. Runs with no GPU too.

Importing this module is cheap: torch and transformers are imported inside methods only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from moechat.backends.api import (
    Backend,
    BackendError,
    BackendSettings,
    Chunk,
    GenerateRequest,
    MemoryPlan,
    Probe,
    Progress,
    ProgressCallback,
    StopCheck,
    probe_modules,
)
from moechat.backends.hookspecs import hookimpl



class MoeOffloadSettings(BackendSettings):
    expert_format: Literal["int4", "fp8", "none"] = Field(
        "int4", description="How routed experts are stored in host memory: int4 (group-wise, about 4.1 bits "
                            "per weight), fp8 (e4m3 with block scales) or none (the checkpoint's dtype; "
                            "for testing, needs the most memory).")
    int4_group_size: int = Field(128, ge=16, description="Weights per int4 scale (along the input dimension). "
                                                          "An int4 checkpoint (GPTQ, compressed-tensors) keeps its own; "
                                                          "where it does not divide the experts' widths, the widest "
                                                          "group that divides it and them is used.")
    vram_budget_gb: float | None = Field(
        None, gt=0, description="Most GPU memory to use, in GB. What is left after the resident weights, KV "
                                "cache, Gated DeltaNet state and a work area becomes the expert cache. "
                                "Empty: the GPU's free memory.")
    cache_experts: int | None = Field(
        None, ge=0, description="GPU cache slots per layer, overriding the budget (0: none).")
    miss_policy: Literal["auto", "hybrid", "pcie", "cpu", "copy"] = Field(
        "auto", description="An expert not in the GPU cache, at decode: the GPU reads it in place over PCIe "
                            "(pcie), the CPU computes it where it lies (cpu), both at once, split so that "
                            "both finish together (hybrid), or copy it into the cache first (copy). auto: "
                            "hybrid where the CPU's measured bandwidth makes it pay, else pcie; without "
                            "a GPU, cpu.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Where the resident model runs: auto "
                                                                      "uses the GPU when there is one.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Compute dtype. auto: bfloat16 on a GPU, float32 on the CPU.")
    max_context: int = Field(8192, ge=16, description="Most tokens per chat (prompt + reply); sizes the KV cache.")
    cache_dir: str = Field("", description="Folder for converted experts (reused by the next load). Empty: "
                                           "$MOECHAT_HOME/cache/moe-offload or the user cache folder. Operator-only "
                                           "(moechat serve --set cache_dir=...): a path it writes to.",
                        json_schema_extra={"operator_only": True})
    cpu_threads: int | None = Field(None, ge=1, description="Threads for experts computed on the CPU. "
                                                            "Empty: torch's default (the physical cores).")


class MoeOffloadBackend(Backend):
    name = "moe-offload"
    label = "moe-offload: experts in RAM, GPU expert cache"
    description = ("Runs Qwen3-Next (and Qwen3-MoE) with the routed experts in host memory as int4 or fp8 "
                   "and everything else on the GPU; a GPU cache keeps recently used experts.")
    Settings = MoeOffloadSettings

    def __init__(self) -> None:
        self.engine: Any = None
        self.tokenizer: Any = None
        self.max_context: int | None = None

    @classmethod
    def probe(cls, settings=None) -> Probe:
        return probe_modules("torch", "transformers", "safetensors")

    @classmethod
    def plan(cls, model: Any, settings: BackendSettings, machine: Any) -> MemoryPlan | None:
        from moechat.backends.moe_offload.plan import plan
        return plan(model, settings, machine)

    # ---- in the worker --------------------------------------------------------------------------
    def load(self, settings: MoeOffloadSettings, progress: ProgressCallback) -> dict[str, Any]:
        from pathlib import Path

        import torch

        from moechat.backends import synthetic
        from moechat.backends.moe_offload.build import load_engine, synthetic_engine
        from moechat.backends.moe_offload.engine import Engine, Options

        folder = settings.model
        is_synthetic = synthetic.is_synthetic(folder)
        if is_synthetic:
            folder = synthetic.tokenizer_folder(settings.model)
        elif not folder:
            from moechat.backends.demo import demo_model_dir
            from moechat.backends.machine import data_dir
            progress(Progress("Preparing the demo model"))
            folder = str(demo_model_dir(data_dir()))
        if not Path(folder).is_dir():
            raise BackendError(f"The model folder {folder} does not exist.")
        device = Engine.resolve_device(settings.device)
        if settings.dtype == "auto":
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        else:
            dtype = getattr(torch, settings.dtype)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        if device == "cuda" and settings.vram_budget_gb:
            from moechat.backends.planning import cap_vram
            cap_vram(settings.vram_budget_gb)
        progress(Progress("Reading the tokenizer"))
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise BackendError(f"The tokenizer in {folder} could not be read: {exc}") from exc
        options = Options(
            expert_format=settings.expert_format, int4_group_size=settings.int4_group_size, device=device,
            dtype=dtype, cache_experts=settings.cache_experts, vram_budget_gb=settings.vram_budget_gb,
            miss_policy=settings.miss_policy, max_context=settings.max_context,
            cache_dir=Path(settings.cache_dir) if settings.cache_dir else None, cpu_threads=settings.cpu_threads)
        try:
            self.engine = (synthetic_engine(settings.model, options, progress) if is_synthetic
                           else load_engine(folder, options, progress))
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError("The GPU ran out of memory while loading: lower vram_budget_gb, cache_experts "
                               "or max_context.") from exc
        own = getattr(self.engine.config, "max_position_embeddings", None)
        self.max_context = min(settings.max_context, own) if own else settings.max_context
        info = dict(self.engine.info)
        info["model_name"] = settings.model if is_synthetic else Path(folder).name
        return info

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.engine.config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids

    def generate(self, request: GenerateRequest, should_stop: StopCheck) -> Iterator[Chunk]:
        from moechat.backends.hf_common import IncrementalDecoder, chat_input_ids, check_prompt_fits
        from moechat.backends.moe_offload.engine import Sampler

        if self.engine is None:
            raise BackendError("No model is loaded.")
        ids = chat_input_ids(self.tokenizer, request)
        sp = request.sampling
        check_prompt_fits(len(ids), sp.max_new_tokens, self.max_context)
        max_new = min(sp.max_new_tokens, self.max_context - len(ids))
        sampler = Sampler(sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty, sp.seed)
        eos = self._eos_ids()
        decoder = IncrementalDecoder(self.tokenizer, sp.stop)
        first = True
        count = 0
        finish = None
        cancelled = False
        for tok in self.engine.generate_ids(ids, sampler, max_new, eos, lambda: should_stop() or decoder.stopped):
            count += 1
            if tok in eos:
                finish = "stop"
                break
            piece = decoder.add([tok])
            if decoder.stopped:
                finish = "stop"
            yield Chunk(text=piece, tokens=1, prompt_tokens=len(ids) if first else None)
            first = False
            if finish:
                break
            if should_stop():
                cancelled = True
                break
        if finish is None:
            finish = "cancelled" if cancelled or should_stop() else ("length" if count >= max_new else "stop")
        tail = decoder.flush() if finish != "cancelled" else ""
        yield Chunk(text=tail, finish_reason=finish, prompt_tokens=len(ids) if first else None)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def context_length(self) -> int | None:
        return self.max_context

    def count_prompt_tokens(self, request: GenerateRequest) -> int | None:
        if self.tokenizer is None:
            return None
        from moechat.backends.hf_common import chat_input_ids
        return len(chat_input_ids(self.tokenizer, request))

    def unload(self) -> None:
        self.engine = None
        self.tokenizer = None
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


@hookimpl
def register_backends(register):
    register(MoeOffloadBackend)
