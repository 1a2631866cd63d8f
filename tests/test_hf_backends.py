"""The transformers and transformers-bnb4 backends against transformers itself."""

from __future__ import annotations

import pytest

from moechat.backends.api import GenerateRequest, Message, SamplingParams
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.testing import collect

PROMPT = [Message(role="user", content="What is the capital of France?")]


def reference_greedy(folder, n, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    text = tok.apply_chat_template([m.model_dump() for m in PROMPT], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    mgr = BackendManager(get_plugin_manager(), tmp_path_factory.mktemp("home"))
    yield mgr
    mgr.close()


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_moe", "llama"])
def test_transformers_greedy_equals_transformers_generate(manager, tiny_models, family):
    folder = tiny_models[family]
    manager.load("transformers", {"model": str(folder), "device": "cpu"})
    text, last = collect(manager.generate(GenerateRequest(
        messages=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=24))))
    expected, ids = reference_greedy(folder, 24)
    assert text == expected
    assert last.usage["completion_tokens"] == len(ids)


def test_stop_strings_end_the_reply_before_the_string(manager, tiny_models):
    folder = tiny_models["qwen3_next"]
    expected, _ = reference_greedy(folder, 24)
    stop = expected[6:9]
    manager.load("transformers", {"model": str(folder), "device": "cpu"})
    text, last = collect(manager.generate(GenerateRequest(
        messages=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=24, stop=[stop]))))
    assert text == expected[: expected.index(stop)]
    assert last.finish_reason == "stop"


def test_bnb4_really_stores_the_moe_experts_in_4_bits(manager, tiny_models):
    """transformers 5 keeps fused experts in 16 bits under load_in_4bit; this backend must not."""
    from safetensors import safe_open

    folder = tiny_models["qwen3_next"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    numel = {k: __import__("math").prod(v) for k, v in sizes.items()}
    expert = sum(n for k, n in numel.items() if ".mlp.experts." in k)
    total = sum(numel.values())
    assert expert / total > 0.5  # the tiny model is expert-heavy, like the real one

    info = manager.load("transformers-bnb4", {"model": str(folder), "device": "cpu", "dtype": "bfloat16"})
    assert info["quantized_expert_params"] == 2 * 4  # gate_up and down in each of 4 layers
    stored = sum(info["weight_bytes"].values())
    # 4 bits per expert weight plus one fp32 absmax per 64 (or double-quantized less), rest at 16 bits
    four_bit_experts = expert / 2 + expert / 64 * 4
    ceiling = four_bit_experts + (total - expert) * 2
    assert stored <= ceiling * 1.05, f"{stored} bytes stored, at most {ceiling:.0f} expected for 4-bit experts"
    # with the experts left in 16 bits (what load_in_4bit alone does) it would be far above
    assert stored < expert * 2


def test_bnb4_output_follows_the_full_precision_model(tiny_models):
    """NF4 changes the numbers a little, not the model: its logits follow the bf16 model's
    far more closely than another model's do."""
    import torch
    from transformers import AutoModelForCausalLM

    from moechat.backends.bnb4 import Bnb4Backend, Bnb4Settings

    folder = str(tiny_models["qwen3_next"])
    backend = Bnb4Backend()
    backend.load(Bnb4Settings(model=folder, device="cpu", dtype="bfloat16"), lambda p: None)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    other = AutoModelForCausalLM.from_config(ref.config, dtype=torch.bfloat16).eval()  # same shapes, other weights
    ids = torch.tensor([list(range(5, 40))])

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    with torch.no_grad():
        got = backend.model(ids).logits.float().flatten()
        want = ref(ids).logits.float().flatten()
        unrelated = other(ids).logits.float().flatten()
    assert corr(got, want) > 0.7, f"4-bit logits correlate only {corr(got, want):.3f} with the bf16 model's"
    assert corr(got, want) > 3 * abs(corr(got, unrelated))
    assert not torch.equal(got, want)  # and it really is the quantized model
