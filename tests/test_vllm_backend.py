"""The vllm and vllm-offload backends on a machine without vLLM or a GPU: what a person sees.

Listing, probe messages (through real interpreters: a missing one, the app's own Python, a bare
venv), the refusal sentence of every combination known to be broken, engine errors turned into
sentences, the memory plan on the target model's shapes, and the pure helpers the worker uses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass

import pytest

from moechat.backends import synthetic
from moechat.backends.api import BackendError
from moechat.backends.machine import GiB, Gpu, Machine
from moechat.backends.manager import BackendManager
from moechat.backends.modelinfo import ModelInfo
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.vllm_ import (HYBRID_ERROR, PYTHON_ENV, VllmBackend, engine_env, VllmOffloadSettings, VllmSettings,
                            explain_engine_error, gpu_weights_measured, is_hybrid, kv_bytes_per_token, memory_plan,
                            offload_warning, parse_version, refusal, state_bytes_per_sequence, weight_offload)
from moechat.backends.vllm_engine import perplexity_from_prompt_logprobs, request_metrics

GB = 1e9
# Qwen3-Next-80B-A3B's config.json (the repository's copy, docs/facts.md).
QWEN3_NEXT_80B = synthetic.qwen3_next_80b_a3b()
LLAMA = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256}
FP8_CKPT = dict(QWEN3_NEXT_80B, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setenv("MOECHAT_NO_GPU", "1")


# ---- listing ---------------------------------------------------------------------------------
def test_both_backends_are_listed_with_their_labels_and_documented_settings():
    backends = get_plugin_manager().backends()
    assert backends["vllm"].label == "vLLM: FP8 or INT4 weights on the GPU"
    assert backends["vllm"].plugin == backends["vllm-offload"].plugin == "vllm"
    for name in ("vllm", "vllm-offload"):
        props = backends[name].cls.Settings.model_json_schema()["properties"]
        assert all(p.get("description") for p in props.values())
    offload = backends["vllm-offload"].cls.Settings.model_json_schema()["properties"]
    assert {"cpu_offload_gb", "offload_backend", "offload_params", "pin_memory", "self_check"} <= set(offload)
    assert offload["quantization"]["enum"] == ["auto", "compressed-tensors", "fp8", "awq", "gptq"]


def test_listing_and_probing_import_nothing_heavy():
    code = ("import json, sys\nfrom moechat.backends.plugins import get_plugin_manager\n"
            "b = get_plugin_manager().backends()\nb['vllm'].probe(); b['vllm-offload'].probe()\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---- probe: exactly what is missing -------------------------------------------------------------
def test_probe_names_a_missing_interpreter_and_how_to_fix_it(monkeypatch, no_gpu, tmp_path):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    probe = VllmBackend.probe()
    assert not probe.available
    assert f"There is no Python at {tmp_path / 'nowhere' / 'python'} (${PYTHON_ENV})" in probe.reason
    assert "run `make vllm-env`" in probe.reason
    assert "no NVIDIA GPU" in probe.reason and "vLLM needs a CUDA GPU" in probe.reason


def test_probe_says_vllm_is_not_importable_in_a_python_without_it(monkeypatch, no_gpu):
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    reason = VllmBackend.probe().reason
    assert f"vLLM is not installed in {sys.executable}" in reason
    assert "lacks" not in reason  # the app's own Python has everything the worker needs


def test_probe_lists_what_the_worker_needs_in_a_bare_environment(monkeypatch, no_gpu, tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    python = tmp_path / "bare" / "bin" / "python"
    monkeypatch.setenv(PYTHON_ENV, str(python))
    reason = VllmBackend.probe().reason
    assert "vLLM is not installed" in reason
    assert "lacks pluggy, pydantic, loguru, psutil, which the moechat worker needs" in reason


def test_loading_without_vllm_gives_the_probe_sentence_through_the_manager(monkeypatch, no_gpu, tmp_path):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "missing-python"))
    manager = BackendManager(get_plugin_manager(), tmp_path)
    try:
        with pytest.raises(BackendError) as err:
            manager.load("vllm-offload", {})
        assert str(err.value).startswith("The vllm-offload backend cannot run here: There is no Python at")
        assert manager.state.status == "empty" and manager._worker is None
    finally:
        manager.close()


def test_a_python_setting_that_does_not_exist_is_refused_before_starting_a_worker(tmp_path):
    with pytest.raises(BackendError, match="There is no Python at .* \\(the python setting\\)"):
        VllmBackend.worker_python(VllmSettings(python=str(tmp_path / "py")))


# ---- known-broken combinations -------------------------------------------------------------------
def offload(**kw) -> VllmOffloadSettings:
    return VllmOffloadSettings(**kw)


def test_hybrid_model_with_offload_on_vllm_before_0_20_is_refused_with_the_error_it_would_hit():
    reason = refusal(offload(), vllm_version="0.19.1", config=QWEN3_NEXT_80B, host_total=None)
    assert reason.startswith("vLLM 0.19.1 cannot offload the weights of a hybrid model like qwen3_next")
    assert f"\u201c{HYBRID_ERROR}\u201d" in reason
    assert "Install vLLM 0.28 or newer" in reason


@pytest.mark.parametrize("version", ["0.20.0", "0.24.2", "0.26.0", "0.27.9rc1"])
@pytest.mark.parametrize("config", [QWEN3_NEXT_80B, LLAMA], ids=["hybrid", "dense"])
def test_offload_on_vllm_0_20_to_0_27_runs_on_the_v1_runner_which_honours_it(version, config):
    """Measured on 0.26.0 (docs/runs/vllm-gpu-check-20261206b-H100): offload of Qwen3-Next ran on the
    V1 runner (host RAM +4.1 GiB, more KV blocks, the same greedy tokens) and was dropped with the V2
    runner forced; 0.28 fixed V2 (PR 51413)."""
    assert refusal(offload(), vllm_version=version, config=config, host_total=None) is None
    assert engine_env(offload(), version)["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "VLLM_USE_V2_MODEL_RUNNER" not in engine_env(offload(), "0.28.0")
    assert "VLLM_USE_V2_MODEL_RUNNER" not in engine_env(VllmSettings(), version)  # no offload: vLLM's pick


@pytest.mark.parametrize("settings,version,config", [
    (offload(), "0.28.0", QWEN3_NEXT_80B),        # fixed versions may try (the self-check then judges)
    (offload(), "0.33.0", QWEN3_NEXT_80B),
    (offload(), "0.19.1", LLAMA),                 # dense models offloaded fine before the V2 runner
    (VllmSettings(), "0.19.1", QWEN3_NEXT_80B),   # no offload: nothing broken
    (VllmSettings(), "0.24.0", QWEN3_NEXT_80B),
])
def test_combinations_that_work_are_not_refused(settings, version, config):
    assert refusal(settings, vllm_version=version, config=config, host_total=int(512 * GB),
                   weight_bytes=int(80 * GB)) is None


def test_a_plan_that_needs_more_host_ram_than_the_machine_has_is_refused():
    pinned = offload(cpu_offload_gb=70, pin_memory=True)
    reason = refusal(pinned, vllm_version="0.33.0", config=QWEN3_NEXT_80B, host_total=int(128 * GB),
                     weight_bytes=int(80 * GB))
    assert reason == ("This load needs about 146 GB of host RAM for 75 GB of offloaded weights (pinned: about "
                      "1.9 times the offloaded bytes), but this machine has 128 GB. Turn pin_memory off, or "
                      "lower cpu_offload_gb (or offload fewer layers).")
    unpinned = offload(cpu_offload_gb=70, pin_memory=False)
    assert refusal(unpinned, vllm_version="0.33.0", config=QWEN3_NEXT_80B, host_total=int(128 * GB),
                   weight_bytes=int(80 * GB)) is None
    # more than the model asked: what offload_params picks (the decoder layers' experts) is all that moves
    huge = offload(cpu_offload_gb=200, pin_memory=False)
    assert refusal(huge, vllm_version="0.33.0", config=QWEN3_NEXT_80B, host_total=int(64 * GB),
                   weight_bytes=int(160 * GB)).startswith("This load needs about 158 GB of host RAM for 155 GB of offloaded weights, but")


def test_quantization_that_contradicts_the_checkpoint_is_refused():
    assert refusal(VllmSettings(quantization="awq"), vllm_version="0.33.0", config=FP8_CKPT, host_total=None) == (
        "The model folder is already quantized with fp8, but quantization is set to awq. "
        "Set quantization to auto (or fp8).")
    assert refusal(VllmSettings(quantization="gptq"), vllm_version="0.33.0", config=LLAMA,
                   host_total=None).startswith("quantization gptq needs a checkpoint quantized with gptq")
    assert refusal(VllmSettings(quantization="fp8"), vllm_version="0.33.0", config=LLAMA, host_total=None) is None
    assert refusal(VllmSettings(quantization="fp8"), vllm_version="0.33.0", config=FP8_CKPT, host_total=None) is None


def test_engine_failures_a_person_can_fix_become_sentences():
    s, o = VllmSettings(), offload()
    assert "0.28 or newer" in explain_engine_error(f"AssertionError: {HYBRID_ERROR}", o)
    kv = explain_engine_error("ValueError: No available memory for the cache blocks. Try increasing "
                              "`gpu_memory_utilization` when initializing the engine.", s)
    assert kv.startswith("The weights leave no GPU memory for the KV cache: lower max_model_len")
    assert "use the vllm-offload backend" in kv
    too_long = explain_engine_error(
        "ValueError: To serve at least one request with the models's max seq len (262144), (6.0 GiB KV cache is "
        "needed, which is larger than the available KV cache memory (1.2 GiB).", o)
    assert too_long.startswith("The weights leave no GPU memory for the KV cache") and "cpu_offload_gb" in too_long
    oom = explain_engine_error("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", o)
    assert oom.startswith("The GPU ran out of memory while loading") and "raise cpu_offload_gb" in oom
    busy = explain_engine_error("ValueError: Free memory on device (10.1/23.6 GiB) on startup is less than "
                                "desired GPU memory utilization (0.9, 21.2 GiB).", s)
    assert busy.startswith("Another program holds part of the GPU's memory")
    assert explain_engine_error("RuntimeError: something nobody has seen", s) is None


# ---- the memory plan on the target model ---------------------------------------------------------
def target_model(weight_bytes: float, quant: str | None, config=QWEN3_NEXT_80B) -> ModelInfo:
    return ModelInfo(path="/m", model_type="qwen3_next", architecture="Qwen3NextForCausalLM",
                     param_count=int(79.7e9), weight_bytes=int(weight_bytes), dtype="F8_E4M3" if quant else "BF16",
                     quantization=quant, quantization_config=None, num_layers=48, num_experts=512,
                     experts_per_token=10, context_length=262144, config=config)


RTX_4090 = Machine(gpus=[Gpu(0, "RTX 4090", 24 * GiB, 0)], host_total=int(128 * GB), host_available=int(120 * GB))


def test_kv_cache_and_linear_attention_state_match_the_measured_facts():
    assert kv_bytes_per_token(QWEN3_NEXT_80B, "auto") == 24 * 1024  # 12 attention layers
    assert kv_bytes_per_token(QWEN3_NEXT_80B, "fp8") == 12 * 1024
    # 36 Gated DeltaNet layers x (2 MiB of float32 recurrent state + 64 KiB of bf16 conv state)
    assert state_bytes_per_sequence(QWEN3_NEXT_80B) == 36 * (2 * 2**20 + 64 * 2**10)
    assert kv_bytes_per_token(LLAMA, "auto") == 32 * 2 * 8 * 128 * 2
    assert state_bytes_per_sequence(LLAMA) == 0
    assert is_hybrid(QWEN3_NEXT_80B) and not is_hybrid(LLAMA)
    assert is_hybrid({"model_type": "x", "layer_types": ["full_attention", "linear_attention"]})


def test_fp8_80b_on_a_24_gb_card_does_not_fit_without_offload_and_says_what_to_do():
    plan = memory_plan(target_model(80 * GB, "block-fp8"), VllmSettings(max_model_len=8192), RTX_4090)
    assert not plan.fits and plan.gpu_available == int(24 * GiB * 0.9)
    assert any("vllm-offload" in a for a in plan.advice)


def test_offload_plan_counts_pinned_host_ram_at_1_9x_and_advises_turning_pinning_off():
    pinned = VllmOffloadSettings(cpu_offload_gb=66, max_model_len=8192)
    plan = memory_plan(target_model(80 * GB, "block-fp8"), pinned, RTX_4090)
    offloaded = next(i for i in plan.items if i.what == "offloaded weights")
    assert offloaded.bytes == int(66 * GiB * 1.9)
    assert not plan.fits and any(a.startswith("Turn pin_memory off") for a in plan.advice)
    unpinned = memory_plan(target_model(80 * GB, "block-fp8"),
                           VllmOffloadSettings(cpu_offload_gb=66, max_model_len=8192, pin_memory=False), RTX_4090)
    assert unpinned.fits, unpinned.advice


# The 4-layer block-FP8 checkpoint at the 80 B widths that vLLM 0.26.0 loaded on an H100
# (docs/runs/vllm-gpu-check-20261206c-H100, check.log): "Checkpoint size: 7.30 GiB"; without
# offload "Model loading took 7.33 GiB"; UVA with cpu_offload_gb = a third of the weights: 4.83 GiB;
# prefetch (group 2, 1 in group, step 1): 4.33 GiB, and "[PrefetchOffloader] Initialized 2 modules.
# Total GPU memory saved: 3.2220 GB, Static buffer pool: 1.6110 GB", the pool outside that 4.33.
FOUR_LAYERS_FP8 = dict(synthetic.config("synthetic:qwen3-next-80b-a3b?layers=4"), torch_dtype="bfloat16",
                       quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
FOUR_LAYERS_BYTES = round(7.30 * GiB)
H100 = Machine(gpus=[Gpu(0, "NVIDIA H100 80GB HBM3", 85520809984, 0)], host_total=135129059328,
               host_available=int(117 * GiB))
RUN = dict(max_model_len=1024, gpu_memory_utilization=0.85, enforce_eager=True)  # scripts/vllm_gpu_check.py


def gpu_weights(plan) -> int:
    return sum(i.bytes for i in plan.items if i.device == "gpu" and ("weights" in i.what or "prefetch" in i.what))


@pytest.mark.parametrize("settings, measured", [
    (VllmSettings(**RUN), 7.33),
    (VllmOffloadSettings(cpu_offload_gb=7.30 / 3, **RUN), 4.83),
    (VllmOffloadSettings(offload_backend="prefetch", offload_group_size=2, offload_num_in_group=1, **RUN), 4.33 + 1.50),
])
def test_plan_puts_the_weights_on_the_gpu_where_vllm_0_26_did(settings, measured):
    model = target_model(FOUR_LAYERS_BYTES, "block-fp8", FOUR_LAYERS_FP8)
    plan = memory_plan(model, settings, H100)
    assert gpu_weights(plan) == pytest.approx(measured * GiB, rel=0.05)
    # the check after loading compares the measured GPU weights with the same number
    assert gpu_weights(plan) == weight_offload(settings, model.weight_bytes, model.config).gpu


def test_prefetch_offloads_decoder_layers_and_keeps_a_pool_of_prefetch_step_layers_on_the_gpu():
    settings = VllmOffloadSettings(offload_backend="prefetch", offload_group_size=2, offload_num_in_group=1, **RUN)
    off = weight_offload(settings, FOUR_LAYERS_BYTES, FOUR_LAYERS_FP8)
    assert off.host == pytest.approx(3.2220e9, rel=0.01) and off.pool == pytest.approx(1.6110e9, rel=0.01)
    plan = memory_plan(target_model(FOUR_LAYERS_BYTES, "block-fp8", FOUR_LAYERS_FP8), settings, H100)
    assert next(i for i in plan.items if i.what == "weights on the GPU").bytes == pytest.approx(4.33 * GiB, rel=0.02)
    # the embeddings and lm_head (151936 x 2048 x bf16, twice) never leave the GPU, whatever is offloaded
    everything = VllmOffloadSettings(offload_backend="prefetch", offload_group_size=1, offload_params="", **RUN)
    kept = weight_offload(everything, FOUR_LAYERS_BYTES, FOUR_LAYERS_FP8).resident
    assert kept == pytest.approx(2 * 151936 * 2048 * 2 + 2048 * 2, abs=8)  # layer bytes split by 4: rounding
    deeper = VllmOffloadSettings(offload_backend="prefetch", offload_group_size=2, offload_num_in_group=1,
                                 offload_prefetch_step=2, **RUN)
    assert weight_offload(deeper, FOUR_LAYERS_BYTES, FOUR_LAYERS_FP8).pool == 2 * off.pool


def test_offload_params_the_plan_cannot_size_are_said_so():
    settings = VllmOffloadSettings(offload_backend="prefetch", offload_params="w2_weight", **RUN)
    plan = memory_plan(target_model(FOUR_LAYERS_BYTES, "block-fp8", FOUR_LAYERS_FP8), settings, H100)
    assert any("offload_params names parts (w2_weight)" in n and "whole decoder layers" in n for n in plan.notes)


# ---- what the worker computes from vLLM's outputs -------------------------------------------------
@dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def test_perplexity_from_prompt_logprobs():
    ids = [5, 7, 9, 11]
    lps = [None, {7: Logprob(-1.0)}, {9: Logprob(-2.0), 3: Logprob(-0.5)}, {11: Logprob(-3.0)}]
    assert perplexity_from_prompt_logprobs(ids, lps) == pytest.approx(math.exp(2.0))
    assert perplexity_from_prompt_logprobs(ids, [None, {7: -1.0}, {9: -1.0}, {11: -1.0}]) == pytest.approx(math.e)
    with pytest.raises(BackendError, match="no prompt logprobs"):
        perplexity_from_prompt_logprobs(ids, None)


@dataclass
class _Stats:  # the fields of vllm.v1.metrics.stats.RequestStateStats that are read
    num_generation_tokens: int
    scheduled_ts: float
    first_token_ts: float
    last_token_ts: float
    first_token_latency: float


@dataclass
class _Completion:
    token_ids: list


@dataclass
class _Output:
    outputs: list
    metrics: _Stats | None


def test_request_metrics_give_time_to_first_token_and_speeds():
    out = _Output([_Completion([1])], _Stats(num_generation_tokens=11, scheduled_ts=100.0, first_token_ts=100.5,
                                            last_token_ts=101.5, first_token_latency=0.6))
    got = request_metrics(out, prompt_tokens=200)
    assert got == {"prompt_tokens": 200, "completion_tokens": 11, "ttft_s": 0.6, "decode_tok_s": 10.0,
                   "prefill_tok_s": 400.0}
    assert request_metrics(_Output([_Completion([1, 2])], None), 5) == {"prompt_tokens": 5, "completion_tokens": 2}


def test_offload_that_did_not_happen_is_noticed_on_the_gpu():
    # 20 GB of weights, 12 GiB asked offloaded: about 6.6 GiB belong on the GPU
    weights, asked = int(20e9), 12 * GiB
    expected = weights - asked
    # the GPU grew by 21 GiB, of which 0.5 GiB KV cache (dense model, 4096 tokens x 128 KiB) and 1 GiB overhead
    measured = gpu_weights_measured(21 * GiB, 4096, LLAMA, "auto")
    assert measured == 21 * GiB - 4096 * 128 * 1024 - GiB
    warning = offload_warning(asked, host_growth=int(30 * GiB), gpu_weights=measured, gpu_weights_expected=expected)
    assert warning.startswith("Weight offload did not happen: 12.0 GiB of weights were asked to stay in host RAM, "
                              "so about 6.6 GiB should be on the GPU, but about 19.5 GiB are")
    honoured = gpu_weights_measured(10 * GiB, 4096, LLAMA, "auto")
    assert offload_warning(asked, host_growth=int(30 * GiB), gpu_weights=honoured, gpu_weights_expected=expected) is None


def test_offload_that_did_not_happen_is_noticed_in_host_ram():
    # hybrid models: the GPU side cannot be told apart, the host side can
    assert gpu_weights_measured(21 * GiB, 4096, QWEN3_NEXT_80B, "auto") is None
    warning = offload_warning(16 * GiB, host_growth=int(0.4 * GiB), gpu_weights=None, gpu_weights_expected=None)
    assert warning.startswith("Weight offload did not happen: 16.0 GiB of weights were asked to stay in host RAM, "
                              "but the engine's processes hold only 0.4 GiB more host RAM")
    assert offload_warning(16 * GiB, host_growth=int(30 * GiB), gpu_weights=None, gpu_weights_expected=None) is None
    assert offload_warning(0, host_growth=0, gpu_weights=0, gpu_weights_expected=0) is None
    assert offload_warning(2 * GiB, host_growth=0, gpu_weights=None, gpu_weights_expected=None) is None  # too small


def test_versions_parse_like_vllm_names_them():
    assert parse_version("0.19.1") == (0, 19, 1)
    assert parse_version("0.20.0rc1") == (0, 20, 0)
    assert parse_version("0.11.1.dev3+g1234abc") == (0, 11, 1)
    assert parse_version("0.33") == (0, 33, 0)
    assert parse_version(None) is None and parse_version("main") is None


# ---- the worker side, in a real worker process ----------------------------------------------------
def test_a_worker_without_vllm_says_so_when_asked_to_load(tmp_path):
    """The worker under a Python that lacks vLLM (here: the app's own) answers the load with a
    sentence, not a trace. (The manager's probe normally stops this earlier.)"""
    from queue import Empty

    from moechat.backends import protocol
    from moechat.backends.manager import WorkerProcess
    entry = get_plugin_manager().backend("vllm-offload")
    worker = WorkerProcess(entry, sys.executable, on_exit=lambda w: None)
    try:
        worker.send(protocol.Load({"model": str(tmp_path)}))
        while True:
            try:
                msg = worker.control.get(timeout=60)
            except Empty:
                pytest.fail("the worker did not answer the load")
            if not isinstance(msg, protocol.LoadProgress):
                break
        assert msg == protocol.LoadFailed(
            "vLLM is not installed in the worker's Python: run `make vllm-env`, or set MOECHAT_VLLM_PYTHON to a "
            "Python that has vLLM.")
    finally:
        worker.stop()
    assert worker.proc.poll() is not None


def test_the_gpu_check_script_reports_why_it_cannot_run_here(tmp_path, contract_model_dir):
    """On a machine without vLLM the GPU check still finishes and writes down why each step failed."""
    env = dict(os.environ, MOECHAT_NO_GPU="1", MOECHAT_HOME=str(tmp_path / "home"),
               **{PYTHON_ENV: str(tmp_path / "no-vllm" / "python")})
    out = subprocess.run([sys.executable, "scripts/vllm_gpu_check.py", "--model", str(contract_model_dir),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 1, out.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert not steps["machine and vLLM environment"]["ok"]
    assert "There is no Python at" in steps["machine and vLLM environment"]["summary"]
    assert steps["vllm: load"]["error"].startswith("BackendUnavailable: The vllm backend cannot run here")
    assert all(not s["ok"] for s in report["steps"])  # nothing claims to have run
    assert "| vllm: load | NO |" in (tmp_path / "report" / "report.md").read_text()
