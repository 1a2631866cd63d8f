"""Memory plans: checked against hand-computed numbers for the 80 B config on 16/24 GB cards with
64/128 GB of RAM, against measured memory for small models on the CPU, and the refusal of a
load that cannot fit (manager and CLI)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from moechat.backends import planning, synthetic
from moechat.backends.api import BackendError, MemoryItem, MemoryPlan
from moechat.backends.bnb4 import Bnb4Backend
from moechat.backends.hf_plan import plan_accelerate
from moechat.backends.machine import Gpu, Machine
from moechat.backends.moe_offload import plan as moe_offload_plan
from moechat.backends.shapes import shapes

GiB = 1024**3
GB = 1e9
ROOT = Path(__file__).resolve().parent.parent

# ---- the 80 B shapes, by hand from the release config (docs/facts.md) -------------------------------------------
H, V, L, E, I_MOE, I_SHARED = 2048, 151936, 48, 512, 512, 512
ATTN_LAYERS, LIN_LAYERS = 12, 36                       # every 4th layer is full attention
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 256
KEY_DIM, VALUE_DIM, V_HEADS = 16 * 128, 32 * 128, 32   # Gated DeltaNet
EMBED = V * H                                          # and the same again for the untied lm_head
ROUTED = L * E * 3 * H * I_MOE                         # 77.3 B
ATTN = ATTN_LAYERS * (H * HEADS * HEAD_DIM * 2 + 2 * H * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM * H + 2 * HEAD_DIM)
CONV_DIM = 2 * KEY_DIM + VALUE_DIM
LIN = LIN_LAYERS * (H * (2 * KEY_DIM + 2 * VALUE_DIM) + H * 2 * V_HEADS + CONV_DIM * 4 + 2 * V_HEADS + 128 + VALUE_DIM * H)
ROUTER = L * E * H
SHARED = L * (3 * H * I_SHARED + H)
NORMS = (2 * L + 1) * H
TOTAL = 2 * EMBED + ROUTED + ATTN + LIN + ROUTER + SHARED + NORMS
KV_PER_TOKEN_BF16 = ATTN_LAYERS * 2 * KV_HEADS * HEAD_DIM * 2          # 24 KiB
STATE_PER_SEQUENCE = LIN_LAYERS * (V_HEADS * 128 * 128 * 4 + CONV_DIM * 4 * 2)  # fp32 recurrent + bf16 conv
INT4 = 0.5 + 2 / 128   # one bf16 scale per 128 weights (moe-offload's symmetric int4)
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # 8-bit absmax per 64 weights, float32 per 256 absmax (double quant)
# what bitsandbytes packs: projections and experts, not the router, in_proj_ba, shared_expert_gate, norms
PACKED = (ATTN_LAYERS * (H * HEADS * HEAD_DIM * 2 + 2 * H * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM * H)
          + LIN_LAYERS * (H * (2 * KEY_DIM + 2 * VALUE_DIM) + VALUE_DIM * H) + L * 3 * H * I_SHARED + ROUTED)

CARDS = [16, 24]
RAMS = [64, 128]


def machine(gpu_gib: int | None, ram_gib: int) -> Machine:
    gpus = [Gpu(0, f"{gpu_gib} GB card", gpu_gib * GiB, 0)] if gpu_gib else []
    return Machine(gpus, ram_gib * GiB, ram_gib * GiB, 16)


@pytest.fixture(scope="module")
def big():
    return synthetic.model_info("synthetic:qwen3-next-80b-a3b")


def item(plan: MemoryPlan, words: str) -> MemoryItem:
    found = [i for i in plan.items if words in i.what]
    assert len(found) == 1, f"{words!r} in {[i.what for i in plan.items]}"
    return found[0]


def test_80b_shapes_match_hand_computed_numbers(big):
    s = shapes(big.config)
    assert s.routed_experts == ROUTED == 77_309_411_328
    assert (s.embed, s.lm_head) == (EMBED, EMBED)
    assert (s.attention, s.linear_attention, s.router, s.shared_experts, s.norms) == (ATTN, LIN, ROUTER, SHARED, NORMS)
    assert s.total == big.param_count == TOTAL
    assert round(TOTAL / 1e9, 1) == 79.7                           # docs/facts.md: 79.7 B
    assert s.one_expert == 3 * H * I_MOE == 3_145_728              # 3.15 M
    assert s.kv_bytes_per_token(2) == KV_PER_TOKEN_BF16 == 24 * 1024
    assert s.state_bytes_per_sequence(2) == STATE_PER_SEQUENCE
    assert 72 * 2**20 <= STATE_PER_SEQUENCE <= 76 * 2**20          # "about 72 MiB per sequence"


def test_shapes_agree_with_transformers_parameter_counts():
    """The count from the config equals what transformers builds, for each family the tests use."""
    import torch
    import transformers

    from moechat.backends.demo import tiny_config

    configs = [tiny_config(f).to_dict() for f in ("qwen3_next", "qwen3_moe", "llama")]
    configs.append(synthetic.config("synthetic:qwen3-next-80b-a3b?layers=4"))
    for cfg in configs:
        hf = {k: v for k, v in cfg.items() if k not in ("moechat_synthetic", "architectures", "transformers_version")}
        hf_cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        assert shapes(cfg).total == sum(p.numel() for p in model.parameters()), cfg.get("model_type")


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("ram", RAMS)
def test_transformers_bf16_80b_never_fits_and_points_to_4bit(big, card, ram):
    plan = plan_accelerate(big, SimpleNamespace(max_context=8192), machine(card, ram))
    weights = item(plan, "weights on the GPU").bytes + item(plan, "offloaded weights").bytes
    weights += sum(i.bytes for i in plan.items if "beyond" in i.what)
    assert weights == TOTAL * 2                                   # 159 GB of bf16
    assert item(plan, "weights on the GPU").bytes == int(0.9 * card * GiB)  # accelerate's 90 %
    assert item(plan, "KV cache").bytes == KV_PER_TOKEN_BF16 * 8192
    assert item(plan, "Gated DeltaNet").bytes == STATE_PER_SEQUENCE
    assert not plan.fits
    text = planning.describe(plan)
    assert text.startswith("This does not fit.") and "moe-offload with expert_format int4" in text
    assert f"{ROUTED * INT4 / GB:.1f} GB" in text                 # the int4 experts, 39.9 GB


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("ram", RAMS)
def test_moe_offload_80b_fits_with_int4_and_sizes_the_cache(big, card, ram):
    plan = moe_offload_plan.plan(big, SimpleNamespace(max_context=8192), machine(card, ram))
    assert item(plan, "routed experts").bytes == int(ROUTED * INT4)  # 39.9 GB in host RAM (docs/facts.md)
    assert round(ROUTED * INT4 / 1e9, 1) == 39.9
    assert item(plan, "routed experts").device == "host"
    resident = (TOTAL - ROUTED) * 2
    assert item(plan, "resident weights").bytes == resident
    assert item(plan, "KV cache").bytes == KV_PER_TOKEN_BF16 * 8192
    assert plan.fits, planning.describe(plan)
    # the budget: the card's free memory once the worker's CUDA context (0.5 GiB) exists; the
    # engine's work area (2 GiB) stays out of the cache
    left = card * GiB - GiB // 2 - resident - KV_PER_TOKEN_BF16 * 8192 - STATE_PER_SEQUENCE - 2 * GiB
    slots = left // (int(3 * H * I_MOE * INT4) * L)
    assert item(plan, "work area").bytes == 2 * GiB
    assert item(plan, "expert cache").note.startswith(f"{slots} of 512")
    assert slots == {16: 121, 24: 232}[card]          # 24 % and 45 % of the experts (docs/memory-plan.md)
    # with the budget set, the plan knows the slots the load must report
    budgeted = moe_offload_plan.plan(big, SimpleNamespace(max_context=8192, vram_budget_gb=card), machine(card, ram))
    assert budgeted.expect == {"cache_slots_per_layer": (left + GiB // 2) // (int(3 * H * I_MOE * INT4) * L)}


@pytest.mark.parametrize("budget, slots", [(24, 240), (16, 130)])
def test_moe_offload_plan_gives_the_slots_the_engine_made_on_a_gpu(big, budget, slots):
    """The engine at the 80 B shapes on the H100 machine (2026-11-28, max_context 4096) made 240
    cache slots per layer at a 24 GiB budget and 130 at 16 GiB (docs/facts.md); the plan says the
    same before loading."""
    settings = SimpleNamespace(vram_budget_gb=budget, max_context=4096)
    plan = moe_offload_plan.plan(big, settings, machine(80, 128))
    assert plan.expect == {"cache_slots_per_layer": slots}
    assert item(plan, "expert cache").note.startswith(f"{slots} of 512")


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["int4", "fp8", "none"])
def test_moe_offload_plan_and_engine_size_the_expert_cache_alike(tmp_path, family, fmt):
    """The plan (from config.json alone) and the engine (after building the model) must agree on
    every number the cache size comes from, and compute the slots with the same function: a real
    engine's resident weights, expert size, KV and state equal the plan's, so the slots the plan
    shows for a budget are the slots the engine makes for it."""
    import torch

    from moechat.backends.demo import build_tiny_model
    from moechat.backends.moe_offload import engine as engine_module
    from moechat.backends.moe_offload.build import load_engine
    from moechat.backends.moe_offload.engine import Options

    folder = build_tiny_model(tmp_path / "model", family, seed=1)
    model = __import__("moechat.backends.modelinfo", fromlist=["inspect"]).inspect(folder)
    eng = load_engine(folder, Options(expert_format=fmt, int4_group_size=16, device="cpu", dtype=torch.float32,
                                      max_context=512, cache_dir=tmp_path / "cache"))
    s = shapes(model.config)
    engine_resident = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    assert s.resident * 4 == engine_resident
    assert moe_offload_plan.expert_bytes(fmt, s.hidden, s.expert_intermediate, 16, 4) == eng.store.expert_bytes()
    assert eng.info["cache_slots_per_layer"] == 0 and eng.info["miss_policy"] == "cpu"   # no GPU: no cache
    # the engine sizes its cache with the plan's function, not a copy of it
    assert engine_module.cache_slots is moe_offload_plan.cache_slots
    kv, state = moe_offload_plan.kv_and_state_bytes(eng.config, 4, 512)
    budget_gib = (engine_resident + kv + state + moe_offload_plan.WORKSPACE_BYTES
                  + 3 * eng.store.expert_bytes() * s.moe_layers) / GiB + 1e-9
    expected = moe_offload_plan.cache_slots(
        cache_experts=None, budget_bytes=int(budget_gib * GiB), resident_bytes=engine_resident, kv_bytes=kv,
        state_bytes=state, expert_bytes=eng.store.expert_bytes(), moe_layers=s.moe_layers,
        num_experts=s.num_experts, top_k=s.experts_per_token, policy="copy")
    assert expected == max(3, s.experts_per_token)
    settings = SimpleNamespace(expert_format=fmt, int4_group_size=16, dtype="float32", max_context=512,
                               vram_budget_gb=budget_gib)
    plan = moe_offload_plan.plan(model, settings, machine(24, 64))
    assert plan.expect == {"cache_slots_per_layer": expected}
    assert item(plan, "expert cache").note.startswith(f"{expected} of {s.num_experts}")


@pytest.mark.parametrize("symmetric", [True, False])
def test_moe_offload_plan_sizes_an_int4_checkpoints_experts_as_the_engine_stores_them(tmp_path, symmetric):
    """A GPTQ checkpoint's experts keep its group (16 here, not the setting's 128) and, when
    asymmetric, a zero point per group: the plan's expert bytes are the store's."""
    import torch

    from test_moe_offload_helpers import read_state, write_gptq

    from moechat.backends.demo import build_tiny_model
    from moechat.backends.modelinfo import inspect
    from moechat.backends.moe_offload.build import load_engine
    from moechat.backends.moe_offload.engine import Options

    src = build_tiny_model(tmp_path / "model", "qwen3_next", seed=1)
    folder = tmp_path / "gptq"
    write_gptq(read_state(src), src, folder, sym=symmetric)
    eng = load_engine(folder, Options(expert_format="int4", device="cpu", dtype=torch.float32,
                                      cache_dir=tmp_path / "cache"))
    assert eng.store.group == 16 and eng.store.zero == (not symmetric)
    model = inspect(folder)
    s = shapes(model.config)
    plan = moe_offload_plan.plan(model, SimpleNamespace(int4_group_size=128, dtype="float32"), machine(None, 64))
    assert item(plan, "routed experts").bytes == eng.store.expert_bytes() * s.num_experts * s.moe_layers


def test_one_kv_and_state_formula_for_every_backend(big):
    """KV cache per token and linear-attention state come from ``shapes`` alone: the vLLM plan,
    moe-offload's engine sizing and the transformers plan give the same bytes for the same config."""
    from moechat.backends import vllm_
    from moechat.backends.demo import tiny_config
    from moechat.backends.moe_offload import adapters

    configs = [big.config, synthetic.config("synthetic:qwen3-next-80b-a3b?layers=4"),
               tiny_config("qwen3_moe").to_dict(), tiny_config("llama").to_dict()]
    for cfg in configs:
        s = shapes(cfg)
        assert vllm_.kv_bytes_per_token(cfg, "auto") == s.kv_bytes_per_token(2)
        assert vllm_.kv_bytes_per_token(cfg, "fp8") == s.kv_bytes_per_token(1)
        assert vllm_.state_bytes_per_sequence(cfg) == s.state_bytes_per_sequence(2)
        assert moe_offload_plan.kv_and_state_bytes(cfg, 2, 1000) == (s.kv_bytes_per_token(2) * 1000,
                                                                     s.state_bytes_per_sequence(2))
    # the 80 B numbers (docs/memory-plan.md): 24 KiB per token, 74.25 MiB of state per sequence
    assert shapes(big.config).kv_bytes_per_token(2) == KV_PER_TOKEN_BF16
    assert shapes(big.config).state_bytes_per_sequence(2) == STATE_PER_SEQUENCE == int(74.25 * 2**20)
    plan = plan_accelerate(big, SimpleNamespace(max_context=1000), machine(24, 128))
    assert item(plan, "KV cache").bytes == KV_PER_TOKEN_BF16 * 1000
    # moe-offload's adapters say what a checkpoint holds, not what a sequence needs
    assert not any(hasattr(cls, "kv_bytes_per_token") or hasattr(cls, "state_bytes") for cls in adapters.adapters())


@pytest.mark.parametrize("card", CARDS)
def test_moe_offload_fp8_needs_128_gb_and_bf16_never_fits(big, card):
    fp8 = SimpleNamespace(expert_format="fp8")
    small_ram = moe_offload_plan.plan(big, fp8, machine(card, 64))
    assert not small_ram.fits and "Use expert_format int4 instead of fp8" in planning.describe(small_ram)
    assert moe_offload_plan.plan(big, fp8, machine(card, 128)).fits
    bf16 = moe_offload_plan.plan(big, SimpleNamespace(expert_format="none"), machine(card, 128))
    assert item(bf16, "routed experts").bytes == ROUTED * 2 and not bf16.fits


def test_moe_offload_budget_above_the_card_is_told_to_lower_it(big):
    plan = moe_offload_plan.plan(big, SimpleNamespace(vram_budget_gb=32), machine(24, 128))
    assert not plan.fits
    assert "Lower vram_budget_gb to at most 24.0: the GPU has 24.0 GiB" in planning.describe(plan)


def test_moe_offload_long_context_on_16_gb_is_told_to_shorten(big):
    plan = moe_offload_plan.plan(big, SimpleNamespace(max_context=262144, cache_experts=100), machine(16, 128))
    assert not plan.fits
    assert "Lower max_context to" in planning.describe(plan)


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("ram", RAMS)
def test_bnb4_80b_does_not_fit_because_offloaded_layers_stay_16_bit(big, card, ram):
    """accelerate places by bitsandbytes' announced sizes (linear layers 4-bit, the fused experts
    still bf16: they are quantized after loading); what goes to the CPU is not quantized."""
    plan = Bnb4Backend.plan(big, bnb4_settings(big), machine(card, ram))
    placed = int((PACKED - ROUTED) * NF4) + (TOTAL - PACKED + ROUTED) * 2
    share = int(0.9 * card * GiB) / placed
    assert item(plan, "weights on the GPU").bytes == int((int(PACKED * NF4) + (TOTAL - PACKED) * 2) * share)
    offloaded = int(TOTAL * 2 * (1 - share))                       # bf16, about 136 GB
    host = item(plan, "offloaded weights").bytes + sum(i.bytes for i in plan.items if "beyond" in i.what)
    assert host == offloaded
    assert not plan.fits
    text = planning.describe(plan)
    assert "stay unquantized in host RAM" in text and "use moe-offload with expert_format int4" in text


@pytest.mark.parametrize("card", CARDS)
def test_bnb4_fits_the_80b_widths_at_4_layers(card):
    """Where the whole model fits the card, everything is 4-bit on the GPU."""
    model = synthetic.model_info("synthetic:qwen3-next-80b-a3b?layers=4")
    plan = Bnb4Backend.plan(model, bnb4_settings(model), machine(card, 64))
    s = shapes(model.config)
    assert item(plan, "weights on the GPU").bytes == int(s.linear_weights * NF4) + (s.total - s.linear_weights) * 2
    assert [i for i in plan.items if "offloaded" in i.what] == []
    assert plan.fits, planning.describe(plan)


def bnb4_settings(model):
    return Bnb4Backend.Settings(model=model.path, max_context=32768)


def fp8_checkpoint(big):
    linear = ATTN + LIN + SHARED + ROUTED
    return dataclasses.replace(big, quantization="block-fp8", weight_bytes=linear + (TOTAL - linear) * 2)


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("ram", RAMS)
def test_vllm_bf16_80b_does_not_fit_and_says_what_to_do(big, card, ram):
    from moechat.backends.vllm_ import VllmBackend

    plan = VllmBackend.plan(big, VllmBackend.Settings(model=big.path, max_model_len=8192), machine(card, ram))
    assert item(plan, "weights on the GPU").bytes == TOTAL * 2
    assert plan.gpu_available == int(card * GiB * 0.9)           # gpu_memory_utilization 0.9
    assert not plan.fits and "vllm-offload" in planning.describe(plan)


@pytest.mark.parametrize("card", CARDS)
def test_vllm_fp8_offload_pinned_memory_takes_1_9x_the_offload(big, card):
    from moechat.backends.vllm_ import VllmOffloadBackend

    model = fp8_checkpoint(big)

    def plan(ram, pin):
        s = VllmOffloadBackend.Settings(model=big.path, max_model_len=8192, cpu_offload_gb=66, pin_memory=pin)
        return VllmOffloadBackend.plan(model, s, machine(card, ram))

    pinned = plan(128, True)
    assert item(pinned, "offloaded weights").bytes == int(66 * GiB * 1.9)
    assert pinned.gpu_bytes <= pinned.gpu_available               # 66 GiB offloaded: the GPU side fits
    assert not pinned.fits and "Turn pin_memory off" in planning.describe(pinned)
    unpinned = plan(128, False)
    assert item(unpinned, "offloaded weights").bytes == 66 * GiB
    assert unpinned.fits and not plan(64, False).fits


# Every installed backend answers through the plugin API (Backend.plan), with its own settings.
EXPECTED_FIT = {"moe-offload": True, "transformers": False, "transformers-bnb4": False,
                "vllm": False, "vllm-offload": False}


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("ram", RAMS)
def test_every_backend_plans_the_80b_through_the_plugin_api(big, card, ram):
    from moechat.backends.plugins import get_plugin_manager

    backends = get_plugin_manager().backends()
    planned = {}
    for name, entry in backends.items():
        if name not in EXPECTED_FIT:
            continue
        settings = entry.cls.Settings.model_validate({"model": big.path})
        plan = entry.cls.plan(big, settings, machine(card, ram))
        assert plan is not None, name
        text = planning.describe(plan)
        planned[name] = plan.fits
        if not plan.fits:
            assert text.startswith("This does not fit.") and plan.advice, (name, text)
    assert {"transformers", "transformers-bnb4", "moe-offload"} <= set(planned)
    assert planned == {n: EXPECTED_FIT[n] for n in planned}


def test_env_overrides_shape_the_machine(monkeypatch):
    m = machine(80, 512)
    monkeypatch.setenv("MOECHAT_HOST_RAM_GB", "64")
    monkeypatch.setenv("MOECHAT_VRAM_BUDGET_GB", "16")
    eff = planning.effective_machine(m)
    assert eff.host_available == 64 * GiB and eff.gpus[0].total == 16 * GiB


# ---- against measurement on the CPU, and refusals ------------------------------------------------

@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    from moechat.backends.manager import BackendManager
    from moechat.backends.plugins import get_plugin_manager

    home = tmp_path_factory.mktemp("moechat-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECHAT_HOME", str(home))
        mp.setenv("MOECHAT_NO_GPU", "1")
        mp.delenv("MOECHAT_HOST_RAM_GB", raising=False)
        m = BackendManager(get_plugin_manager(), home)
        yield m
        m.close()


@pytest.mark.parametrize("backend, tolerance", [("transformers-bnb4", 0.05), ("transformers", 0.01)])
def test_plan_matches_measured_memory_on_cpu(manager, backend, tolerance):
    """synthetic:small (0.2 GB of float32 weights; 35 MB as 4-bit) loaded on the CPU: the weights
    the worker holds equal the plan's to 1 % (5 % for 4-bit: the worker's count leaves out the
    absmax scales, the plan includes them); the worker's resident memory after loading is within
    30 % of the planned worker + weights, and below the plan's host total."""
    info = manager.load(backend, {"model": "synthetic:small", "device": "cpu"})
    plan = manager.state.plan
    planned_weights = item(plan, "weights").bytes
    assert abs(info["weight_bytes"]["cpu"] - planned_weights) <= tolerance * planned_weights
    at_load = planned_weights + item(plan, "worker process").bytes
    assert abs(info["worker_rss_bytes"] - at_load) <= 0.30 * at_load
    assert info["worker_rss_bytes"] <= plan.host_bytes
    assert "plan_check" not in info
    assert planning.check_after_load(plan, info) is None
    # the same measurement against a plan that put the weights on a GPU: the check says so
    wrong = MemoryPlan(items=[MemoryItem("weights on the GPU", "gpu", int(2 * GB)),
                              MemoryItem("worker process", "host", int(0.5 * GB))], gpu_available=int(16 * GB))
    warning = planning.check_after_load(wrong, dict(info, weight_bytes={"cpu": int(2 * GB)}))
    assert warning and "on the GPU where the plan put 2.0 GB" in warning
    # a plan that offloads, measured with nothing offloaded: said in so many words
    offload = MemoryPlan(items=[MemoryItem("weights on the GPU", "gpu", int(10 * GB)),
                                MemoryItem("offloaded weights in host RAM", "host", int(30 * GB))],
                         gpu_available=int(80 * GB), host_available=int(100 * GB))
    warning = planning.check_after_load(offload, {"weight_bytes": {"cuda": int(40 * GB)}})
    assert "offload did not happen as planned" in warning
    # accelerate's offloaded parameters show up as "meta": that is the planned offload
    assert planning.check_after_load(offload, {"weight_bytes": {"cuda": int(10 * GB), "meta": int(30 * GB)}}) is None


def test_a_load_that_cannot_fit_is_refused_with_the_plan_sentence(manager, monkeypatch):
    monkeypatch.setenv("MOECHAT_HOST_RAM_GB", "0.1")
    with pytest.raises(BackendError) as err:
        manager.load("transformers", {"model": "synthetic:tiny", "device": "cpu"})
    text = str(err.value)
    assert text.startswith("This does not fit.") and "host RAM: needs" in text and "force" in text
    # the refusal comes before anything is unloaded: the model loaded before stays
    assert manager.state.ready and manager.state.model.path == "synthetic:small"
    info = manager.load("transformers", {"model": "synthetic:tiny", "device": "cpu"}, force=True)
    assert info["model_name"] == "synthetic:tiny" and manager.state.ready


def test_after_a_moe_offload_load_the_planned_cache_slots_are_compared(manager):
    """A real moe-offload load in a worker: the slots the plan computed are the slots the engine
    reports, so no warning; a plan that computed others gets a sentence naming both numbers."""
    info = manager.load("moe-offload", {"model": "synthetic:tiny", "device": "cpu", "cache_experts": 3})
    plan = manager.state.plan
    assert plan.expect == {"cache_slots_per_layer": 3} == {"cache_slots_per_layer": info["cache_slots_per_layer"]}
    assert "plan_check" not in info
    drifted = dataclasses.replace(plan, expect={"cache_slots_per_layer": 10})
    warning = planning.check_after_load(drifted, info)
    assert warning.startswith("Measured memory differs from the plan: cache slots per layer is 3 where the plan "
                              "computed 10")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moechat.webui.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **env), timeout=120)


def test_cli_plan_for_80b_on_a_24_gb_card(tmp_path):
    out = run_cli("plan", "synthetic:qwen3-next-80b-a3b", "--backend", "transformers", "--gpu-gb", "24",
                  "--ram-gb", "128", "--set", "max_context=8192", MOECHAT_HOME=str(tmp_path))
    assert out.returncode == 3, out.stderr
    assert "This does not fit." in out.stdout and "moe-offload with expert_format int4" in out.stdout
    assert "offloaded weights in host RAM" in out.stdout
    js = run_cli("plan", "synthetic:qwen3-next-80b-a3b", "--backend", "transformers", "--gpu-gb", "24",
                 "--ram-gb", "128", "--json", MOECHAT_HOME=str(tmp_path))
    data = json.loads(js.stdout)
    assert data["fits"] is False and data["summary"].startswith("This does not fit.")


def test_cli_plan_refuses_with_the_sentence_and_bad_input_gets_one_too(tmp_path):
    out = run_cli("plan", "synthetic:tiny", "--backend", "transformers", "--gpu-gb", "0",
                  MOECHAT_HOME=str(tmp_path), MOECHAT_HOST_RAM_GB="0.1")
    assert out.returncode == 3
    assert "This does not fit. host RAM: needs 0.6 GB of 0.1 GB available." in out.stdout
    bad = run_cli("plan", "synthetic:nonesuch", "--backend", "transformers", MOECHAT_HOME=str(tmp_path))
    assert bad.returncode == 1 and "There is no synthetic model 'nonesuch'." in bad.stderr


def test_cli_plan_on_a_folder_with_only_config_json(tmp_path):
    """Will it fit, before downloading 80-160 GB: config.json alone gives the plan; with the
    index file (the shards not downloaded) the weights' size is the index's total."""
    folder = tmp_path / "Qwen3-Next-80B-A3B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(synthetic.qwen3_next_80b_a3b()))
    args = ("--gpu-gb", "24", "--ram-gb", "128", "--json")
    out = run_cli("plan", str(folder), "--backend", "moe-offload", *args, MOECHAT_HOME=str(tmp_path))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["fits"] and data["model"] == str(folder)
    experts = next(i for i in data["items"] if i["what"] == "routed experts")
    assert experts["bytes"] == int(ROUTED * INT4) and experts["device"] == "host"
    # the FP8 release's index: 80 GB of weights, none of its shards here
    fp8 = 80_000_000_000
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": fp8},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00041.safetensors"}}))
    out = run_cli("plan", str(folder), "--backend", "vllm", *args, MOECHAT_HOME=str(tmp_path))
    assert out.returncode == 3, out.stderr
    data = json.loads(out.stdout)
    assert next(i for i in data["items"] if i["what"] == "weights on the GPU")["bytes"] == fp8
    # without the backend named, the suggestion for the model plans it
    out = run_cli("plan", str(folder), *args, MOECHAT_HOME=str(tmp_path))
    assert json.loads(out.stdout)["backend"] == "moe-offload"
    # a folder whose config.json cannot size a model still gets a sentence
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_next"}))
    bad = run_cli("plan", str(folder), "--backend", "moe-offload", MOECHAT_HOME=str(tmp_path))
    assert bad.returncode == 1 and "has no weights, and its config.json lacks" in bad.stderr

