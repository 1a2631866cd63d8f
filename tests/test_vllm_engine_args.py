"""Settings -> vLLM engine and sampling arguments, checked against vLLM's real signatures.

vLLM cannot be installed here (CUDA-only, a 290 MB wheel), so the signatures below are written
down. They were first read from vLLM's documentation (2026-05-07) and then checked field by field,
annotation by annotation, against vLLM 0.26.0's own wheel (``vllm/engine/arg_utils.py``, class
``EngineArgs``; ``AsyncEngineArgs`` adds ``enable_log_requests``), the version installed on the lent
GPU machine on 2026-12-06, where ``scripts/vllm_gpu_check.py``'s signature step compared them with
``dataclasses.fields(AsyncEngineArgs)`` and found every recorded name. Other sources:

- ``OffloadBackend``: ``vllm/config/offload.py``; ``CacheDType``: ``vllm/config/cache.py``;
  ``QuantizationMethods``: ``vllm/model_executor/layers/quantization/__init__.py``.
- ``SamplingParams`` / ``RequestOutputKind``: ``vllm/sampling_params.py``; ``AsyncLLM``:
  ``vllm/v1/engine/async_llm.py``; ``RequestStateStats`` / ``SchedulerStats``:
  ``vllm/v1/metrics/stats.py``.
- ``gdn_prefill_backend`` (0.26.0): ``Literal["flashinfer", "triton", "cutedsl"] | None``; vLLM's
  ``auto`` picks FlashInfer on Hopper (``vllm/model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py``).
"""

from __future__ import annotations

import itertools

import pytest

from moechat.backends.api import GenerateRequest, Message, SamplingParams
from moechat.backends.vllm_ import (VllmOffloadSettings, VllmSettings, engine_env, engine_kwargs, param_segments,
                            sampling_kwargs)

RECORDED_FROM = "vLLM 0.26.0's wheel (vllm/engine/arg_utils.py and friends), checked 2026-12-06"

# name -> the Python types a value may have (from the annotation; None where it is Optional).
ENGINE_ARGS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "tokenizer": (str, type(None)),
    "trust_remote_code": (bool,),
    "download_dir": (str, type(None)),
    "load_format": (str,),
    "dtype": (str,),
    "kv_cache_dtype": (str,),
    "seed": (int,),
    "max_model_len": (int,),
    "pipeline_parallel_size": (int,),
    "tensor_parallel_size": (int,),
    "data_parallel_size": (int,),
    "enable_expert_parallel": (bool,),
    "block_size": (int, type(None)),
    "enable_prefix_caching": (bool, type(None)),
    "offload_backend": (str,),
    "cpu_offload_gb": (float,),
    "cpu_offload_params": (set,),
    "offload_group_size": (int,),
    "offload_num_in_group": (int,),
    "offload_prefetch_step": (int,),
    "offload_params": (set,),
    "gpu_memory_utilization": (float,),
    "kv_cache_memory_bytes": (int, type(None)),
    "max_num_batched_tokens": (int, type(None)),
    "max_num_seqs": (int, type(None)),
    "max_logprobs": (int,),
    "disable_log_stats": (bool,),
    "revision": (str, type(None)),
    "quantization": (str, type(None)),
    "enforce_eager": (bool,),
    "disable_custom_all_reduce": (bool,),
    "enable_log_requests": (bool,),  # AsyncEngineArgs
    "gdn_prefill_backend": (str, type(None)),
}
GDN_PREFILL_BACKEND = {"flashinfer", "triton", "cutedsl"}
# Literal choices of the fields above (a subset where the Literal is long).
OFFLOAD_BACKEND = {"auto", "uva", "prefetch"}
CACHE_DTYPE = {"auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla"}
QUANTIZATION_METHODS = {"awq", "fp8", "gptq", "gptq_marlin", "awq_marlin", "compressed-tensors", "bitsandbytes",
                        "gguf", "modelopt", "mxfp4", "moe_wna16", "experts_int8", "quark", "torchao", "inc"}

SAMPLING_PARAMS: dict[str, tuple[type, ...]] = {
    "n": (int,), "presence_penalty": (float,), "frequency_penalty": (float,), "repetition_penalty": (float,),
    "temperature": (float,), "top_p": (float,), "top_k": (int,), "min_p": (float,), "seed": (int, type(None)),
    "stop": (str, list, type(None)), "stop_token_ids": (list, type(None)), "ignore_eos": (bool,),
    "max_tokens": (int, type(None)), "min_tokens": (int,), "logprobs": (int, type(None)),
    "prompt_logprobs": (int, type(None)), "detokenize": (bool,), "skip_special_tokens": (bool,),
    "spaces_between_special_tokens": (bool,), "include_stop_str_in_output": (bool,),
}
REQUEST_OUTPUT_KIND = {"CUMULATIVE", "DELTA", "FINAL_ONLY"}
ASYNC_LLM_METHODS = {
    "from_engine_args": ("engine_args", "start_engine_loop", "usage_context", "stat_loggers"),
    "generate": ("prompt", "sampling_params", "request_id"),
    "abort": ("request_id",),
    "shutdown": (),
}
REQUEST_STATE_STATS = {"num_generation_tokens", "arrival_time", "queued_ts", "scheduled_ts", "first_token_ts",
                       "last_token_ts", "first_token_latency"}
SCHEDULER_STATS = {"num_running_reqs", "num_waiting_reqs", "kv_cache_usage"}
# vllm/envs.py (plus the Hugging Face ones vLLM honours)
ENV_VARS = {"VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
            "VLLM_WORKER_MULTIPROC_METHOD", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_USE_DEEP_GEMM",
            "VLLM_USE_V2_MODEL_RUNNER"}


def all_settings():
    """Every value of every choice setting, plus the edges of the numeric ones."""
    for q, kv, eager, mml in itertools.product(
            ["auto", "compressed-tensors", "fp8", "awq", "gptq"], ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
            [False, True], [None, 4096]):
        yield VllmSettings(quantization=q, kv_cache_dtype=kv, enforce_eager=eager, max_model_len=mml,
                           gpu_memory_utilization=0.5, max_num_seqs=2, tensor_parallel_size=2)
    for backend, params, pin in itertools.product(["uva", "prefetch"], ["experts", "", "experts, w2_weight"],
                                                  [True, False]):
        yield VllmOffloadSettings(offload_backend=backend, offload_params=params, pin_memory=pin,
                                  cpu_offload_gb=24.5, offload_group_size=4, offload_num_in_group=2)


def check_value(name: str, value, recorded: dict[str, tuple[type, ...]]) -> None:
    assert name in recorded, f"{name} is not a field of vLLM's signature ({RECORDED_FROM})"
    allowed = recorded[name]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    assert ok, f"{name}={value!r} has type {type(value).__name__}, vLLM takes {allowed}"


@pytest.mark.parametrize("settings", list(all_settings()), ids=lambda s: f"{type(s).__name__}")
def test_every_engine_argument_is_a_real_field_of_the_right_type(settings):
    kw = engine_kwargs(settings, "/models/m")
    for name, value in kw.items():
        check_value(name, value, ENGINE_ARGS)
    assert kw["kv_cache_dtype"] in CACHE_DTYPE
    if "quantization" in kw:
        assert kw["quantization"] in QUANTIZATION_METHODS
    if "offload_backend" in kw:
        assert kw["offload_backend"] in OFFLOAD_BACKEND
    # FlashInfer's Gated DeltaNet kernel is not asked for by default: on Hopper it stopped vLLM 0.26
    assert kw["gdn_prefill_backend"] == "triton"


def test_the_translation_says_what_the_settings_say():
    kw = engine_kwargs(VllmSettings(gpu_memory_utilization=0.8, max_model_len=8192, quantization="awq",
                                    kv_cache_dtype="fp8", enforce_eager=True, max_num_seqs=3,
                                    tensor_parallel_size=2), "/m")
    assert kw == {"model": "/m", "tokenizer": "/m", "trust_remote_code": False, "gpu_memory_utilization": 0.8,
                  "kv_cache_dtype": "fp8", "enforce_eager": True, "max_num_seqs": 3, "tensor_parallel_size": 2,
                  "disable_log_stats": False, "max_model_len": 8192, "quantization": "awq",
                  "gdn_prefill_backend": "triton"}
    assert "gdn_prefill_backend" not in engine_kwargs(VllmSettings(gdn_prefill_backend="auto"), "/m")
    assert engine_kwargs(VllmSettings(gdn_prefill_backend="flashinfer"), "/m")["gdn_prefill_backend"] in GDN_PREFILL_BACKEND
    # auto leaves quantization to the checkpoint, and no offload keys appear without offload
    plain = engine_kwargs(VllmSettings(), "/m")
    assert "quantization" not in plain and "max_model_len" not in plain
    assert not any("offload" in k for k in plain)


def test_offload_settings_map_to_the_backend_they_name():
    uva = engine_kwargs(VllmOffloadSettings(cpu_offload_gb=30, offload_params="experts"), "/m")
    assert uva["offload_backend"] == "uva" and uva["cpu_offload_gb"] == 30.0
    assert uva["cpu_offload_params"] == {"experts"}
    assert not {"offload_group_size", "offload_params"} & set(uva)
    pre = engine_kwargs(VllmOffloadSettings(offload_backend="prefetch", offload_group_size=8,
                                            offload_num_in_group=2, offload_prefetch_step=1,
                                            offload_params=""), "/m")
    assert pre["offload_backend"] == "prefetch" and "cpu_offload_gb" not in pre
    assert (pre["offload_group_size"], pre["offload_num_in_group"], pre["offload_prefetch_step"]) == (8, 2, 1)
    assert pre["offload_params"] == set()  # empty: vLLM offloads every parameter of an offloaded layer
    assert param_segments(" experts , w2_weight,") == {"experts", "w2_weight"}


def test_pinned_memory_off_sets_vllms_environment_variable():
    assert engine_env(VllmOffloadSettings(pin_memory=False))["VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY"] == "1"
    assert "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY" not in engine_env(VllmOffloadSettings(pin_memory=True))
    assert "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY" not in engine_env(VllmSettings())
    for s in all_settings():
        assert set(engine_env(s, "0.26.0")) <= ENV_VARS


def test_deep_gemm_is_off_unless_the_setting_asks_for_it():
    assert engine_env(VllmSettings())["VLLM_USE_DEEP_GEMM"] == "0"
    assert engine_env(VllmOffloadSettings(deep_gemm=True))["VLLM_USE_DEEP_GEMM"] == "1"


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(temperature=0, top_k=0, seed=None, stop=[]),
    SamplingParams(temperature=1.3, top_p=0.9, top_k=40, seed=7, stop=["\n\n", "User:"], repetition_penalty=1.1),
])
def test_sampling_arguments_are_real_sampling_params(sampling):
    request = GenerateRequest(messages=[Message(role="user", content="hi")], sampling=sampling)
    kw = sampling_kwargs(request, max_tokens=33)
    for name, value in kw.items():
        check_value(name, value, SAMPLING_PARAMS)
    assert kw["max_tokens"] == 33 and kw["temperature"] == float(sampling.temperature)
    assert ("top_k" in kw) == bool(sampling.top_k)  # 0 means "all tokens": left to vLLM's default
    assert kw.get("seed") == sampling.seed and kw.get("stop", []) == sampling.stop


def test_the_engine_uses_only_recorded_vllm_names():
    """The worker-side engine names vLLM classes and members; they must be the recorded ones."""
    import inspect

    from moechat.backends import vllm_engine
    source = inspect.getsource(vllm_engine)
    assert "RequestOutputKind.DELTA" in source and "RequestOutputKind.FINAL_ONLY" in source
    assert {"DELTA", "FINAL_ONLY"} <= REQUEST_OUTPUT_KIND
    for method, params in ASYNC_LLM_METHODS.items():
        assert f".{method}(" in source or method == "from_engine_args" and "from_engine_args(args" in source
        assert all(p.isidentifier() for p in params)
    assert "prompt_logprobs=0" in source and "prompt_logprobs" in SAMPLING_PARAMS
    for field in ("first_token_latency", "first_token_ts", "last_token_ts", "num_generation_tokens",
                  "scheduled_ts"):
        assert f'"{field}"' in source and field in REQUEST_STATE_STATS
    assert '"kv_cache_usage"' in source and "kv_cache_usage" in SCHEDULER_STATS
