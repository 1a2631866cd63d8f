"""The vLLM backends: ``vllm`` (FP8 or INT4 weights on the GPU) and ``vllm-offload`` (part of
the weights in host RAM, streamed to the GPU on every forward).

vLLM pins its own torch and transformers, so it lives in its own environment (``make vllm-env``
builds ``vllm-venv`` in moechat's data folder, with moechat installed there too); the worker runs
under that Python. Which Python: the ``python`` setting, else ``$MOECHAT_VLLM_PYTHON``, else
``vllm-venv/bin/python`` in the data folder.

Everything in this module is cheap and pure (it runs in the app process too): settings, the
probe, the memory plan, the refusals of combinations known to be broken, and the translation of
settings into vLLM's engine arguments. The engine itself (AsyncLLM, in the worker) is in
``moechat.backends.vllm_engine``; vllm is imported only there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from moechat.backends.api import (Backend, BackendError, BackendSettings, Chunk, GenerateRequest, MemoryItem,
                          MemoryPlan, Probe, Progress, ProgressCallback, StopCheck)
from moechat.backends.hookspecs import hookimpl
from moechat.backends.shapes import text_config, try_shapes

PYTHON_ENV = "MOECHAT_VLLM_PYTHON"
DEFAULT_VENV = "vllm-venv"  # under the data folder (machine.data_dir), where `make vllm-env` builds it
WORKER_NEEDS = ("pluggy", "pydantic", "loguru", "psutil")
GiB = 1024**3
GB = 1e9

# Facts about vLLM versions (docs/facts.md): the hybrid-model offload assert is gone since 0.20.0
# (PR 36461); the V2 model runner honours cpu_offload_gb since 0.28.0 (PR 51413). Before that the
# V1 runner does: measured on 0.26.0 (docs/runs/vllm-gpu-check-20261206b-H100), weight offload of
# Qwen3-Next ran on V1 (vLLM's own pick for hybrid models) and was dropped with V2 forced, so
# offload on 0.20-0.27 runs with the V1 runner forced (engine_env).
HYBRID_OFFLOAD_FIXED = (0, 20, 0)
V2_RUNNER_OFFLOAD_FIXED = (0, 28, 0)
PINNED_FACTOR = 1.9  # pinned offload takes about 1.9x the offloaded bytes of host RAM (issues 56410, 58178)
HYBRID_ERROR = "Cannot re-initialize the input batch when CPU weight offloading is enabled"
HYBRID_MODEL_TYPES = {
    "qwen3_next", "jamba", "bamba", "nemotron_h", "falcon_h1", "granitemoehybrid", "zamba2",
    "plamo2", "lfm2", "lfm2_moe", "minimax_m1", "minimax_text_01", "qwen3_5", "qwen3_5_moe", "kimi_linear",
}
PROCESS_OVERHEAD = 3 * GiB  # host RAM of the engine's processes besides offloaded weights (torch, CUDA context)
GPU_OVERHEAD = 1 * GiB  # activations, CUDA graphs, sampler buffers
MIN_JUDGED_OFFLOAD = 4 * GiB  # below this, host RAM growth cannot tell whether the offload happened


# ---- settings ---------------------------------------------------------------------------------
class VllmSettings(BackendSettings):
    python: str = Field("", description=f"Python interpreter that has vLLM installed. Empty: ${PYTHON_ENV}, "
                                        f"else the environment `make vllm-env` builds ({DEFAULT_VENV}). Operator-only "
                                        "(moechat serve --set python=...): it names a program to run.",
                        json_schema_extra={"operator_only": True})
    gpu_memory_utilization: float = Field(
        0.90, gt=0.05, le=1.0, description="Share of the GPU's memory vLLM may take for weights, activations "
                                           "and KV cache. vLLM reserves all of it at load.")
    max_model_len: int | None = Field(
        None, ge=16, description="Most tokens per chat (prompt + reply). Empty: the model's own limit. "
                                 "Lower it when the KV cache does not fit.")
    quantization: Literal["auto", "compressed-tensors", "fp8", "awq", "gptq"] = Field(
        "auto", description="auto: whatever the checkpoint says (FP8, compressed-tensors, AWQ or GPTQ INT4). "
                            "fp8 on an unquantized checkpoint quantizes it to FP8 while loading.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV cache precision. fp8 halves its memory at a small cost in accuracy.")
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture: loads faster and uses less memory, "
                                                   "decodes slower.")
    max_num_seqs: int = Field(4, ge=1, le=1024, description="Most requests decoded together. A few is plenty "
                                                           "for a chat on a LAN; each costs KV cache.")
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="Split the model over this many GPUs.")
    deep_gemm: bool = Field(
        False, description="Use DeepGEMM's FP8 kernels (Hopper and newer). Off: vLLM takes CUTLASS's, which "
                           "need no compiling. On: the first start compiles DeepGEMM's kernels one by one, "
                           "for many minutes (over 9 on an H100 for a 4-layer Qwen3-Next, against under 3 without).")
    gdn_prefill_backend: Literal["triton", "flashinfer", "auto"] = Field(
        "triton", description="Kernel for the Gated DeltaNet prompt pass (Qwen3-Next). triton: vLLM's own, "
                              "starts at once. flashinfer: FlashInfer's; on Hopper (H100/H200) it needs the "
                              "nvidia-cutlass-dsl package, or vLLM 0.26 stops at the first prompt with 'SM90 GDN "
                              "prefill DSL kernel is unavailable'. auto: vLLM's choice (FlashInfer on Hopper).")


class VllmOffloadSettings(VllmSettings):
    cpu_offload_gb: float = Field(
        16.0, gt=0, le=4096, description="GiB of weights per GPU kept in host RAM and streamed to the GPU on "
                                         "every forward (slow: under 1 tok/s for large offloads).")
    offload_backend: Literal["uva", "prefetch"] = Field(
        "uva", description="uva: the GPU reads offloaded weights from pinned host RAM (cpu_offload_gb). "
                           "prefetch: the offload_params of some layers (offload_group_size) are offloaded and "
                           "copied ahead into GPU buffers that hold offload_prefetch_step layers.")
    offload_params: str = Field(
        "experts", description="Which parameters to offload: comma-separated name segments "
                               "('experts' puts MoE expert weights first). Empty: any parameter.")
    offload_group_size: int = Field(
        8, ge=1, le=1024, description="prefetch only: in every group of this many layers, offload the last "
                                      "offload_num_in_group.")
    offload_num_in_group: int = Field(1, ge=1, le=1024, description="prefetch only: layers offloaded per group.")
    offload_prefetch_step: int = Field(1, ge=1, le=64, description="prefetch only: layers copied ahead.")
    pin_memory: bool = Field(
        True, description="Pin the offloaded weights in host RAM: faster transfers, but costs about 1.9x the "
                          "offloaded bytes of host RAM. Off: about 1x, slower.")
    self_check: bool = Field(
        True, description="After loading, score a fixed English paragraph and mark the backend as producing "
                          "wrong output when it fails (vLLM offload has produced garbage on hybrid models).")


# ---- where vLLM lives -----------------------------------------------------------------------------
def vllm_python(setting: str = "") -> tuple[Path, str]:
    """The interpreter to run the worker with, and where that choice came from."""
    if setting:
        return Path(setting).expanduser(), "the python setting"
    env = os.environ.get(PYTHON_ENV, "").strip()
    if env:
        return Path(env).expanduser(), f"${PYTHON_ENV}"
    from moechat.backends.machine import data_dir
    return data_dir() / DEFAULT_VENV / "bin" / "python", f"the default, {DEFAULT_VENV} in moechat's data folder"


_FACTS_SCRIPT = """
import importlib.metadata as md, importlib.util as u, json, sys
def version(name):
    try:
        return md.version(name)
    except Exception:
        return None
print(json.dumps({"python": sys.version.split()[0],
                  "vllm": version("vllm") if u.find_spec("vllm") else None,
                  "torch": version("torch"),
                  "missing": [n for n in %r if u.find_spec(n) is None]}))
""" % (WORKER_NEEDS,)


def interpreter_facts(python: Path) -> dict[str, Any]:
    """vLLM's version and what the worker lacks in ``python``, without importing vllm there."""
    out = subprocess.run([str(python), "-c", _FACTS_SCRIPT], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"{python} did not run ({tail}).")
    return json.loads(out.stdout.strip().splitlines()[-1])


def python_problems(python: Path, source: str) -> list[str]:
    """Sentences saying what is wrong with ``python`` as a vLLM worker interpreter; empty when fine."""
    fix = f"run `make vllm-env`, or set {PYTHON_ENV} (or the python setting) to a Python that has vLLM"
    if not python.exists():
        return [f"There is no Python at {python} ({source}): {fix}."]
    if not os.access(python, os.X_OK):
        return [f"{python} ({source}) is not executable: {fix}."]
    try:
        facts = interpreter_facts(python)
    except (BackendError, OSError, subprocess.SubprocessError, ValueError) as exc:
        return [f"{exc} ({source}): {fix}."]
    problems = []
    if not facts["vllm"]:
        problems.append(f"vLLM is not installed in {python} ({source}): {fix}, "
                        f"or run `{python} -m pip install vllm`.")
    if facts["missing"]:
        problems.append(f"{python} lacks {', '.join(facts['missing'])}, which the moechat worker needs: "
                        f"run `{python} -m pip install {' '.join(facts['missing'])}`.")
    return problems


def gpu_problem() -> str | None:
    from moechat.backends.machine import gpus
    if not gpus():
        return "This machine has no NVIDIA GPU that nvidia-smi can see; vLLM needs a CUDA GPU."
    return None


# ---- versions and models ------------------------------------------------------------------------------
def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string like 0.19.1, 0.20.0rc1 or 0.11.1.dev3+g1234."""
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def is_hybrid(config: dict[str, Any]) -> bool:
    """Whether a model mixes attention with linear-attention or state-space layers (like Qwen3-Next)."""
    text = text_config(config)
    if config.get("model_type") in HYBRID_MODEL_TYPES or text.get("model_type") in HYBRID_MODEL_TYPES:
        return True
    layer_types = text.get("layer_types") or []
    return any(t in ("linear_attention", "mamba", "mamba2", "conv") for t in layer_types)


def checkpoint_quant_method(config: dict[str, Any]) -> str | None:
    qcfg = config.get("quantization_config") or config.get("compression_config") or {}
    method = str(qcfg.get("quant_method", "")).lower()
    return method or None


def uses_offload(settings: VllmSettings) -> bool:
    return isinstance(settings, VllmOffloadSettings)


# vLLM offloads decoder layers only: ``make_layers`` (vllm/model_executor/models/utils.py) hands the
# layers it builds to ``get_offloader().wrap_modules``, its one call site, so the embeddings, the
# lm_head and the final norm always stay on the GPU. In those layers both offloaders take the
# parameters whose name has a segment in offload_params (``f".{p}." in f".{name}."``).
# UVA (vllm/model_executor/offloader/uva.py) moves them to host RAM until cpu_offload_gb is reached.
# Prefetch (vllm/model_executor/offloader/prefetch.py, PrefetchOffloader) moves those of layer i
# when ``i % group_size >= group_size - num_in_group``, then allocates a StaticBufferPool on the
# GPU with ``slot_capacity=prefetch_step`` copies of each offloaded parameter (name, shape, dtype),
# so prefetch_step layers' worth of the offloaded weights sit on the GPU as well. vLLM 0.26.0 logs
# both ("[PrefetchOffloader] Initialized 2 modules. Total GPU memory saved: 3.2220 GB, Static
# buffer pool: 1.6110 GB"), and its "Model loading took" leaves the pool out:
# docs/runs/vllm-gpu-check-20261206c-H100.
OFFLOAD_PARTS = {"experts": ("routed_experts",)}  # offload_params segments the plan can size from the config


def param_segments(text: str) -> set[str]:
    return {p.strip() for p in text.split(",") if p.strip()}


@dataclass(frozen=True)
class WeightOffload:
    """Where the settings put the weights, in bytes per GPU: ``resident`` on the GPU, ``host`` in
    host RAM, and ``pool`` of GPU buffers the offloaded layers are copied into ahead of use (prefetch)."""

    resident: int
    host: int = 0
    pool: int = 0
    sized: bool = True  # False: offload_params names parts the plan cannot size; whole layers assumed

    @property
    def gpu(self) -> int:
        """Weights on the GPU after loading, prefetch buffers included (what nvidia-smi sees)."""
        return self.resident + self.pool


def non_layer_bytes(config: dict[str, Any]) -> int:
    """Bytes of the embeddings, the lm_head (unless tied) and the final norm, from the config: vocab
    x hidden elements each, kept in the model's dtype (16-bit) by FP8 and INT4 checkpoints alike."""
    text = text_config(config)
    hidden, vocab = text.get("hidden_size") or 0, text.get("vocab_size") or 0
    dtype = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "")
    element = 4 if dtype in ("float32", "F32") else 2
    return (vocab * hidden * (1 if text.get("tie_word_embeddings") else 2) + hidden) * element


def offloadable_share(config: dict[str, Any], params: set[str]) -> tuple[float, bool]:
    """The share of the decoder layers' parameters that the offload_params segments pick, and
    whether the plan could size them (parameter counts from the config's shapes)."""
    if not params:
        return 1.0, True
    s = try_shapes(config)
    if s is None or not params <= OFFLOAD_PARTS.keys():
        return 1.0, False
    layers = s.total - s.embed - s.lm_head - s.hidden
    picked = sum(getattr(s, part) for p in params for part in OFFLOAD_PARTS[p])
    return (min(1.0, picked / layers) if layers > 0 else 1.0), True


def weight_offload(settings: VllmSettings, weight_bytes: int, config: dict[str, Any]) -> WeightOffload:
    """What ``settings`` move to host RAM (and, for prefetch, what they add on the GPU) of a model of
    ``weight_bytes`` with ``config``: the one formula for the plan, the host-RAM refusal and the
    check after loading."""
    per_gpu = weight_bytes // settings.tensor_parallel_size
    if not isinstance(settings, VllmOffloadSettings):
        return WeightOffload(per_gpu)
    share, sized = offloadable_share(config, param_segments(settings.offload_params))
    offloadable = int(max(weight_bytes - non_layer_bytes(config), 0) * share) // settings.tensor_parallel_size
    if settings.offload_backend == "uva":
        host = min(int(settings.cpu_offload_gb * GiB), offloadable)
        return WeightOffload(per_gpu - host, host, 0, sized)
    group, in_group = settings.offload_group_size, settings.offload_num_in_group
    layers = text_config(config).get("num_hidden_layers")
    if not layers:
        host = int(offloadable * min(1.0, in_group / group))
        return WeightOffload(per_gpu - host, host, 0, sized)
    chosen = sum(1 for i in range(layers) if i % group >= group - in_group)
    per_layer = offloadable // layers
    host = chosen * per_layer
    return WeightOffload(per_gpu - host, host, settings.offload_prefetch_step * per_layer if chosen else 0, sized)


def host_bytes_needed(settings: VllmSettings, offloaded: int) -> int:
    pinned = isinstance(settings, VllmOffloadSettings) and settings.pin_memory
    return int(offloaded * (PINNED_FACTOR if pinned else 1.0)) + PROCESS_OVERHEAD


def refusal(settings: VllmSettings, *, vllm_version: str | None, config: dict[str, Any],
            host_total: int | None, weight_bytes: int | None = None) -> str | None:
    """The sentence that refuses a combination known to be broken, or None when it may run.

    ``config`` is the model's config.json; ``host_total`` the machine's RAM in bytes."""
    version = parse_version(vllm_version)
    model_type = config.get("model_type", "this model")
    setting_q = settings.quantization
    ckpt_q = checkpoint_quant_method(config)
    if setting_q != "auto" and ckpt_q and setting_q != ckpt_q and not (setting_q == "fp8" and ckpt_q == "fp8"):
        return (f"The model folder is already quantized with {ckpt_q}, but quantization is set to {setting_q}. "
                f"Set quantization to auto (or {ckpt_q}).")
    if setting_q in ("awq", "gptq", "compressed-tensors") and not ckpt_q:
        return (f"quantization {setting_q} needs a checkpoint quantized with {setting_q}, and this model folder "
                "is not quantized. Use an AWQ/GPTQ/compressed-tensors checkpoint, or set quantization to fp8 "
                "(quantizes while loading) or auto.")
    if uses_offload(settings) and version is not None:
        shown = vllm_version
        if version < HYBRID_OFFLOAD_FIXED and is_hybrid(config):
            return (f"vLLM {shown} cannot offload the weights of a hybrid model like {model_type}: it stops "
                    f"with \u201c{HYBRID_ERROR}\u201d. Install vLLM 0.28 or newer in the vLLM environment "
                    "(`make vllm-env`), or use the vllm backend without offload and a smaller (INT4) checkpoint.")
    if uses_offload(settings) and host_total and weight_bytes:
        offloaded = weight_offload(settings, weight_bytes, config).host
        needed = host_bytes_needed(settings, offloaded) * settings.tensor_parallel_size
        if needed > host_total:
            pinned = " (pinned: about 1.9 times the offloaded bytes)" if settings.pin_memory else ""
            advice = "Turn pin_memory off, or lower" if settings.pin_memory else "Lower"
            return (f"This load needs about {needed / GB:.0f} GB of host RAM for {offloaded / GB:.0f} GB of "
                    f"offloaded weights{pinned}, but this machine has {host_total / GB:.0f} GB. "
                    f"{advice} cpu_offload_gb (or offload fewer layers).")
    return None


# ---- settings -> vLLM ---------------------------------------------------------------------------
def engine_kwargs(settings: VllmSettings, model_path: str) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``AsyncEngineArgs`` for ``settings``. Pure: checked in the
    tests against the field names and types recorded from vLLM's source."""
    kw: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "trust_remote_code": False,
        "gpu_memory_utilization": float(settings.gpu_memory_utilization),
        "kv_cache_dtype": settings.kv_cache_dtype,
        "enforce_eager": bool(settings.enforce_eager),
        "max_num_seqs": int(settings.max_num_seqs),
        "tensor_parallel_size": int(settings.tensor_parallel_size),
        "disable_log_stats": False,  # request metrics (time to first token) need stats on
    }
    if settings.max_model_len is not None:
        kw["max_model_len"] = int(settings.max_model_len)
    if settings.quantization != "auto":
        kw["quantization"] = settings.quantization
    if settings.gdn_prefill_backend != "auto":
        kw["gdn_prefill_backend"] = settings.gdn_prefill_backend
    if isinstance(settings, VllmOffloadSettings):
        params = param_segments(settings.offload_params)
        kw["offload_backend"] = settings.offload_backend
        if settings.offload_backend == "uva":
            kw["cpu_offload_gb"] = float(settings.cpu_offload_gb)
            kw["cpu_offload_params"] = params
        else:
            kw["offload_group_size"] = int(settings.offload_group_size)
            kw["offload_num_in_group"] = int(settings.offload_num_in_group)
            kw["offload_prefetch_step"] = int(settings.offload_prefetch_step)
            kw["offload_params"] = params
    return kw


def engine_env(settings: VllmSettings, vllm_version: str | None = None) -> dict[str, str]:
    """Environment variables the engine needs for ``settings`` on ``vllm_version`` (set before the
    engine starts)."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the worker has threads (its reader, the engine's event loop): forking it is unsafe
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           # off unless asked: its kernels compile for many minutes at the first start (the
           # setting's description; measured in docs/vllm.md)
           "VLLM_USE_DEEP_GEMM": "1" if settings.deep_gemm else "0"}
    if isinstance(settings, VllmOffloadSettings):
        if not settings.pin_memory:
            env["VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY"] = "1"
        version = parse_version(vllm_version)
        if version is not None and HYBRID_OFFLOAD_FIXED <= version < V2_RUNNER_OFFLOAD_FIXED:
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # V2 drops cpu_offload_gb before 0.28; V1 honours it
    return env


def sampling_kwargs(request: GenerateRequest, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``SamplingParams`` for a chat request (output_kind is added by
    the engine)."""
    sp = request.sampling
    kw: dict[str, Any] = {
        "max_tokens": int(max_tokens),
        "temperature": float(sp.temperature),
        "top_p": float(sp.top_p),
        "repetition_penalty": float(sp.repetition_penalty),
        "skip_special_tokens": True,
    }
    if sp.top_k:
        kw["top_k"] = int(sp.top_k)
    if sp.seed is not None:
        kw["seed"] = int(sp.seed)
    if sp.stop:
        kw["stop"] = list(sp.stop)
    return kw


def explain_engine_error(text: str, settings: VllmSettings) -> str | None:
    """A sentence for an engine failure a person can fix, or None for anything else."""
    low = text.lower()
    if HYBRID_ERROR.lower() in low:
        return (f"This vLLM cannot offload the weights of a hybrid model (\u201c{HYBRID_ERROR}\u201d). "
                "Install vLLM 0.28 or newer in the vLLM environment (`make vllm-env`).")
    if "no available memory for the cache blocks" in low or "insufficient memory for kv cache" in low or (
            "kv cache" in low and "larger than the available" in low) or "max_model_len" in low and "kv cache" in low:
        more = " or raise cpu_offload_gb" if isinstance(settings, VllmOffloadSettings) else \
            ", use the vllm-offload backend"
        return ("The weights leave no GPU memory for the KV cache: lower max_model_len, set kv_cache_dtype to "
                f"fp8{more}, or use a smaller (INT4) checkpoint.")
    if "out of memory" in low:
        more = "raise cpu_offload_gb" if isinstance(settings, VllmOffloadSettings) else "use the vllm-offload backend"
        return ("The GPU ran out of memory while loading: use a smaller (INT4) checkpoint, lower max_model_len, "
                f"or {more}.")
    if "free memory on device" in low and "memory utilization" in low:
        return ("Another program holds part of the GPU's memory, so vLLM cannot reserve gpu_memory_utilization "
                "of it: close that program or lower gpu_memory_utilization.")
    if "quantization method specified in the model config" in low:
        return "The checkpoint's quantization differs from the quantization setting: set quantization to auto."
    return None


# ---- the memory plan ------------------------------------------------------------------------------
def kv_bytes_per_token(config: dict[str, Any], kv_cache_dtype: str) -> int:
    """KV cache per token (the one formula, ``shapes``) in the cache's element size: one byte
    for an fp8 cache, else two. 0 for a config whose shapes cannot be read."""
    s = try_shapes(config)
    return s.kv_bytes_per_token(1 if kv_cache_dtype.startswith("fp8") else 2) if s else 0


def state_bytes_per_sequence(config: dict[str, Any]) -> int:
    """Linear-attention (Gated DeltaNet) state of a hybrid model, per sequence (``shapes``)."""
    s = try_shapes(config) if is_hybrid(config) else None
    return s.state_bytes_per_sequence(2) if s else 0


def memory_plan(model: Any, settings: VllmSettings, machine: Any) -> MemoryPlan:
    """What loading ``model`` (a ModelInfo) with ``settings`` needs on ``machine`` (a Machine)."""
    weights = int(model.weight_bytes)
    notes = []
    if settings.quantization == "fp8" and not model.quantization and model.dtype in ("BF16", "F16", "F32"):
        weights = weights * 1 // (4 if model.dtype == "F32" else 2)
        notes.append("fp8 quantizes the weights while loading: about 1 byte per parameter on the GPU.")
    tp = settings.tensor_parallel_size
    off = weight_offload(settings, weights, model.config)
    offloaded = off.host
    if not off.sized:
        notes.append(f"offload_params names parts ({settings.offload_params}) whose size the plan cannot tell "
                     "from the config: it assumes whole decoder layers are offloaded.")
    context = settings.max_model_len or model.context_length or 4096
    kv = kv_bytes_per_token(model.config, settings.kv_cache_dtype) * context // tp
    state = state_bytes_per_sequence(model.config) * settings.max_num_seqs // tp
    per = f"per GPU, {tp} GPU(s)" if tp > 1 else ""
    items = [MemoryItem("weights on the GPU", "gpu", off.resident, per)]
    if off.pool:
        items.append(MemoryItem("prefetch buffers for the offloaded layers", "gpu", off.pool,
                                f"{settings.offload_prefetch_step} layer(s) copied ahead" + (f", {per}" if per else "")))
    items.append(MemoryItem("KV cache for one full-length chat", "gpu", kv, f"{context} tokens"))
    if state:
        items.append(MemoryItem("linear-attention state", "gpu", state, f"{settings.max_num_seqs} sequences"))
    items.append(MemoryItem("activations and CUDA graphs (estimate)", "gpu", GPU_OVERHEAD))
    if offloaded:
        pinned = isinstance(settings, VllmOffloadSettings) and settings.pin_memory
        items.append(MemoryItem("offloaded weights", "host", int(offloaded * (PINNED_FACTOR if pinned else 1)) * tp,
                                "pinned: about 1.9x the offloaded bytes" if pinned else "not pinned"))
    items.append(MemoryItem("engine processes (torch, CUDA context)", "host", PROCESS_OVERHEAD * tp))
    gpu_total = machine.gpu_total
    gpu_available = int(gpu_total * settings.gpu_memory_utilization) if gpu_total else None
    if gpu_total:
        notes.append(f"vLLM reserves gpu_memory_utilization ({settings.gpu_memory_utilization:g}) of the GPU "
                     "at load; the KV cache gets what the weights leave.")
    advice = []
    plan = MemoryPlan(items=items, gpu_available=gpu_available, host_available=machine.host_available,
                      notes=notes)
    if gpu_available is not None and plan.gpu_bytes > gpu_available:
        if isinstance(settings, VllmOffloadSettings) and settings.offload_backend == "prefetch":
            advice.append("Offload more layers per group (raise offload_num_in_group or lower offload_group_size), "
                          "lower max_model_len, or use an INT4 checkpoint.")
        elif isinstance(settings, VllmOffloadSettings):
            advice.append("Raise cpu_offload_gb, lower max_model_len, or use an INT4 checkpoint.")
        else:
            advice.append("Use an INT4 (AWQ/GPTQ) checkpoint, lower max_model_len, set kv_cache_dtype to fp8, "
                          "or use the vllm-offload backend.")
    if plan.host_available is not None and plan.host_bytes > plan.host_available:
        if isinstance(settings, VllmOffloadSettings) and settings.pin_memory:
            advice.append("Turn pin_memory off (about 1x the offloaded bytes instead of 1.9x), or lower "
                          "cpu_offload_gb.")
        else:
            advice.append("Lower cpu_offload_gb, or close programs that hold host RAM.")
    plan.advice = advice
    return plan


def gpu_weights_measured(gpu_growth: int | None, kv_cache_tokens: int | None, config: dict[str, Any],
                         kv_cache_dtype: str) -> int | None:
    """Weights on the GPU as measured after loading: the engine's GPU memory minus the KV cache
    vLLM allocated and the overhead. None where it cannot be told (hybrid models share KV pages
    with their linear-attention state, so their KV bytes are not known here)."""
    if gpu_growth is None or not kv_cache_tokens or is_hybrid(config):
        return None
    return gpu_growth - kv_cache_tokens * kv_bytes_per_token(config, kv_cache_dtype) - GPU_OVERHEAD


def offload_warning(asked: int, host_growth: int | None, gpu_weights: int | None,
                    gpu_weights_expected: int | None) -> str | None:
    """Compare measured memory after loading with the offload asked for: ``gpu_weights`` (weights
    found on the GPU, see gpu_weights_measured) against ``gpu_weights_expected`` (the weights minus
    the offload), and the host RAM the engine's processes gained against the offload. A sentence
    when the offload evidently did not happen."""
    if asked <= 0:
        return None
    if gpu_weights is not None and gpu_weights_expected is not None and asked >= GiB \
            and gpu_weights > gpu_weights_expected + asked * 0.5:
        return (f"Weight offload did not happen: {asked / GiB:.1f} GiB of weights were asked to stay in host RAM, "
                f"so about {gpu_weights_expected / GiB:.1f} GiB should be on the GPU, but about "
                f"{gpu_weights / GiB:.1f} GiB are (GPU memory used minus the KV cache). This vLLM probably "
                "ignored the offload settings; expect running out of GPU memory.")
    if asked >= MIN_JUDGED_OFFLOAD and host_growth is not None and host_growth < asked * 0.5:
        return (f"Weight offload did not happen: {asked / GiB:.1f} GiB of weights were asked to stay in host RAM, "
                f"but the engine's processes hold only {max(host_growth, 0) / GiB:.1f} GiB more host RAM after "
                "loading. This vLLM probably ignored the offload settings; expect running out of GPU memory.")
    return None


# ---- the backends ------------------------------------------------------------------------------
class VllmBackend(Backend):
    name = "vllm"
    label = "vLLM: FP8 or INT4 weights on the GPU"
    description = ("vLLM's AsyncLLM in its own environment (`make vllm-env`). Fast when the whole model fits "
                   "on the GPU: FP8, compressed-tensors, or AWQ/GPTQ INT4 checkpoints.")
    Settings = VllmSettings
    torch_gpu_memory = False  # the engine core is a process of its own; a budget arrives as gpu_memory_utilization

    engine: Any = None
    tokenizer: Any = None
    model_path: str = ""
    info: dict[str, Any]

    @classmethod
    def probe(cls, settings: VllmSettings | None = None) -> Probe:
        python, source = vllm_python(settings.python if settings is not None else None)
        problems = python_problems(python, source)
        gpu = gpu_problem()
        if gpu:
            problems.append(gpu)
        return Probe(not problems, " ".join(problems))

    @classmethod
    def worker_python(cls, settings: VllmSettings) -> str | None:
        python, source = vllm_python(settings.python)
        if not python.exists():
            raise BackendError(python_problems(python, source)[0])
        return str(python)

    @classmethod
    def plan(cls, model: Any, settings: VllmSettings, machine: Any) -> MemoryPlan | None:
        if model is None:
            return None
        return memory_plan(model, settings, machine)

    # ---- in the worker, under vLLM's Python ------------------------------------------------------
    def load(self, settings: VllmSettings, progress: ProgressCallback) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        import psutil

        from moechat.backends import vllm_engine
        try:
            vllm_version = version("vllm")
        except PackageNotFoundError:
            raise BackendError("vLLM is not installed in the worker's Python: run `make vllm-env`, or set "
                               f"{PYTHON_ENV} to a Python that has vLLM.") from None
        folder = Path(settings.model)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"The model folder's config.json could not be read: {exc}") from exc
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        reason = refusal(settings, vllm_version=vllm_version, config=config,
                         host_total=psutil.virtual_memory().total, weight_bytes=weights)
        if reason:
            raise BackendError(reason)
        os.environ.update(engine_env(settings, vllm_version))
        self.model_path = str(folder)
        progress(Progress("Starting vLLM (loading weights, profiling memory, capturing CUDA graphs)"))
        before = vllm_engine.measure_memory()
        try:
            self.engine = vllm_engine.VllmEngine(engine_kwargs(settings, self.model_path))
        except BackendError:
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            first = text.strip().splitlines()[0][:300]
            raise BackendError(explain_engine_error(text, settings) or f"vLLM failed to start: {first}") from exc
        after = vllm_engine.measure_memory()
        self.tokenizer = self.engine.tokenizer
        info: dict[str, Any] = {"model_name": folder.name, "vllm_version": vllm_version,
                                "engine_args": {k: sorted(v) if isinstance(v, set) else v
                                                for k, v in engine_kwargs(settings, self.model_path).items()},
                                "warnings": []}
        info["memory_after_load"] = vllm_engine.memory_growth(before, after)
        offload = weight_offload(settings, weights, config)
        asked = offload.host
        growth = info["memory_after_load"]
        growth["kv_cache_tokens"] = self.engine.kv_cache_tokens()
        growth["gpu_weights_bytes"] = gpu_weights_measured(growth.get("gpu_bytes"), growth["kv_cache_tokens"],
                                                           config, settings.kv_cache_dtype)
        expected = offload.gpu * settings.tensor_parallel_size
        warning = offload_warning(asked * settings.tensor_parallel_size, growth.get("host_bytes"),
                                  growth["gpu_weights_bytes"], expected)
        if warning:
            info["warnings"].append(warning)
        self.info = info
        self.output_check: dict[str, Any] | None = None
        if isinstance(settings, VllmOffloadSettings) and settings.self_check:
            from moechat.backends import selfcheck
            progress(Progress("Checking the output (perplexity of a fixed paragraph)"))
            result = selfcheck.check_backend(self, folder)
            self.output_check = result.to_dict()
            info["selfcheck"] = self.output_check
            if result.wrong_output:
                info["wrong_output"] = True
                info["warnings"].append(result.message)
        return info

    def context_length(self) -> int | None:
        return self.engine.max_model_len if self.engine is not None else None

    def count_prompt_tokens(self, request: GenerateRequest) -> int | None:
        from moechat.backends.hf_common import chat_input_ids
        return len(chat_input_ids(self.tokenizer, request)) if self.tokenizer is not None else None

    def generate(self, request: GenerateRequest, should_stop: StopCheck) -> Iterator[Chunk]:
        from moechat.backends.hf_common import chat_input_ids, check_prompt_fits
        ids = chat_input_ids(self.tokenizer, request)
        context = self.context_length()
        check_prompt_fits(len(ids), request.sampling.max_new_tokens, context)
        max_tokens = min(request.sampling.max_new_tokens, context - len(ids)) if context else \
            request.sampling.max_new_tokens
        yield from self.engine.stream(ids, sampling_kwargs(request, max_tokens), should_stop)

    def perplexity(self, text: str) -> float:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise BackendError("The text to score needs at least two tokens.")
        return self.engine.perplexity(ids)

    def stats(self) -> dict[str, Any]:
        out = self.engine.stats() if self.engine is not None else {}
        check = getattr(self, "output_check", None)
        if check is not None:
            out["output_check"] = ("wrong output: " + check["message"]) if check["passed"] is False else \
                ("passed" if check["passed"] else "not checked") + f" ({check['message']})"
        warnings = self.info.get("warnings") if getattr(self, "info", None) else None
        if warnings:
            out["warnings"] = " ".join(warnings)
        return out

    def unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()


class VllmOffloadBackend(VllmBackend):
    name = "vllm-offload"
    label = "vLLM offload: part of the weights in host RAM (slow; output self-checked)"
    description = ("vLLM with CPU weight offload (UVA or prefetch), experts first. Every forward streams the "
                   "offloaded weights over PCIe, so decoding is slow; on load a self-check scores a fixed "
                   "paragraph, because offload has produced garbage on hybrid models.")
    Settings = VllmOffloadSettings


@hookimpl
def register_backends(register):
    register(VllmBackend)
    register(VllmOffloadBackend)
