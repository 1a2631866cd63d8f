"""Carrying vLLM to the lent GPU machine: the wheelhouse's parts (split, stored one call at a time,
joined with their hashes checked), the GPU image's package list, and the block-FP8 checkpoint the
GPU check loads, written at tiny size here and read back by moechat's FP8 loader and transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheelhouse():
    spec = importlib.util.spec_from_file_location("vllm_wheelhouse", ROOT / "scripts" / "vllm_wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    sizes = {"big-1.0-py3-none-any.whl": 5 * 2**20 + 123, "mid-2.0-py3-none-any.whl": 2 * 2**20 + 7,
             "small-0.1-py3-none-any.whl": 1000, "extra-3.0-py3-none-any.whl": 3 * 2**20 + 1}
    files = []
    for i, (name, size) in enumerate(sizes.items()):
        path = folder / name
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_wheelhouse.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_parts_stored_one_call_at_a_time_join_into_the_same_wheels(tmp_path, wheels):
    w = wheelhouse()
    manifest = w.pack(wheels, tmp_path / "parts", 2 * 2**20, optional={"extra"})
    parts = sorted(manifest["parts"])
    assert all(size <= 2 * 2**20 for size in manifest["parts"].values())
    big = next(f for f in manifest["files"] if f["name"].startswith("big"))
    assert len(big["pieces"]) == 3  # a wheel bigger than a part is cut
    # optional wheels come last, in parts of their own
    assert manifest["optional_parts"] == parts[-len(manifest["optional_parts"]):]
    assert all(f["group"] == "optional" for f in manifest["files"] if f["name"].startswith("extra"))

    store, out = tmp_path / "store", tmp_path / "assembled"
    core = [p for p in parts if p not in manifest["optional_parts"]]
    for p in core[:-1]:
        result = run_script("store", str(tmp_path / "parts" / p), str(store))
        assert result.returncode == 0, result.stderr
        assert core[-1] in result.stdout.split("still missing:")[1]
    early = run_script("assemble", str(store), str(out))
    assert early.returncode != 0 and f"Parts not stored yet: {core[-1]}" in early.stderr
    run_script("store", str(tmp_path / "parts" / core[-1]), str(store))
    done = run_script("assemble", str(store), str(out))
    assert done.returncode == 0, done.stderr
    for f in wheels:  # the core wheels, byte for byte; the optional one was not carried
        if f.name.startswith("extra"):
            assert not (out / f.name).exists()
        else:
            assert (out / f.name).read_bytes() == f.read_bytes()
    for p in manifest["optional_parts"]:
        run_script("store", str(tmp_path / "parts" / p), str(store))
    assert run_script("assemble", str(store), str(out)).returncode == 0
    assert all((out / f.name).read_bytes() == f.read_bytes() for f in wheels)


def test_a_damaged_piece_is_refused_with_the_part_to_carry_again(tmp_path, wheels):
    w = wheelhouse()
    manifest = w.pack(wheels, tmp_path / "parts", 2 * 2**20)
    first = sorted(manifest["parts"])[0]
    piece = next(p for f in manifest["files"] for p in f["pieces"] if p["part"] == first)
    damaged = tmp_path / "parts" / first / piece["file"]
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = run_script("store", str(tmp_path / "parts" / first), str(tmp_path / "store"))
    assert result.returncode != 0
    assert "SHA-256" in result.stderr and "rebuild the parts" in result.stderr


def test_the_image_list_reads_names_with_and_without_versions(tmp_path):
    w = wheelhouse()
    image = w.read_image_list()
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0"
    assert "jinja2" in image and image["jinja2"] is None
    assert "vllm" not in image
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# pip list --format=freeze\nTorch==2.11.0\nhuggingface_hub==1.33.0\n\n")
    assert w.read_image_list(freeze) == {"torch": "2.11.0", "huggingface-hub": "1.33.0"}


def test_the_tiny_fp8_checkpoint_reads_back_through_moechat_and_transformers(tmp_path):
    import torch
    from transformers import AutoConfig

    from moechat.backends import fp8_checkpoint
    from moechat.backends.moe_offload import quant
    from moechat.backends.moe_offload.loader import Checkpoint
    from moechat.backends.moe_offload.quant_config import checkpoint_format

    folder = fp8_checkpoint.write("synthetic:tiny", tmp_path / "ckpt", device="cpu", shard_bytes=50_000,
                                  progress=lambda _: None)
    config = json.loads((folder / "config.json").read_text())
    assert checkpoint_format(config) == "fp8-block"
    qcfg = config["quantization_config"]
    assert qcfg["weight_block_size"] == [128, 128] and "lm_head" in qcfg["modules_to_not_convert"]
    assert "model.layers.0.mlp.gate" in qcfg["modules_to_not_convert"]
    assert "model.layers.0.linear_attn.in_proj_ba" in qcfg["modules_to_not_convert"]
    assert "model.layers.0.linear_attn.A_log" in qcfg["modules_to_not_convert"]
    assert "model.layers.0.linear_attn" not in qcfg["modules_to_not_convert"]  # it holds FP8 Linears too
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    ck = Checkpoint(folder)
    names = set(ck.weight_map)
    # experts per expert, float8 with a bf16 block scale; router, norms and embeddings in bf16
    expert = "model.layers.0.mlp.experts.7.down_proj.weight"
    assert expert in names and expert + "_scale_inv" in names
    assert ck.get(expert).dtype == torch.float8_e4m3fn
    assert ck.get(expert + "_scale_inv").dtype == torch.bfloat16
    assert ck.get("model.layers.0.mlp.gate.weight").dtype == torch.bfloat16
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv" in names
    assert "model.layers.0.linear_attn.in_proj_ba.weight_scale_inv" not in names
    entries = {e.name: e for e in ck.entries([expert])}
    dense = quant.fp8_dequantize(entries[expert].weight, entries[expert].scale.float(), entries[expert].block,
                                 torch.float32)
    assert 0.005 < dense.std().item() < 0.05  # random weights of a sane size
    assert AutoConfig.from_pretrained(str(folder)).num_hidden_layers == 4
    lm_head = ck.get("lm_head.weight").float()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = len(tokenizer)
    assert lm_head[vocab:].abs().sum() == 0 and lm_head[:vocab].abs().sum() > 0
    assert lm_head[tokenizer.eos_token_id].abs().sum() == 0  # replies never end early


def test_the_80b_layout_at_four_layers_has_the_release_shapes():
    from moechat.backends import fp8_checkpoint

    tensors = {n: (shape, kind) for n, shape, kind in
               fp8_checkpoint.checkpoint_tensors("synthetic:qwen3-next-80b-a3b?layers=4")}
    assert tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"] == ((12288, 2048), "fp8")
    assert fp8_checkpoint.scale_shape((12288, 2048)) == (96, 16)
    assert tensors["model.layers.3.mlp.experts.511.gate_proj.weight"] == ((512, 2048), "fp8")
    assert tensors["model.layers.3.mlp.experts.511.down_proj.weight"] == ((2048, 512), "fp8")
    assert tensors["model.layers.3.self_attn.q_proj.weight"] == ((8192, 2048), "fp8")
    assert tensors["lm_head.weight"] == ((151936, 2048), "bf16")
    fp8 = sum(s[0] * s[1] for s, k in tensors.values() if k == "fp8")
    assert 6.4e9 < fp8 < 6.8e9  # about 6.6 GB of FP8 weights, plus 1.2 GB of bf16 embeddings


def test_the_docs_name_the_version_and_the_parts_the_script_builds():
    w = wheelhouse()
    doc = (ROOT / "docs" / "vllm.md").read_text()
    assert f"**vLLM {w.DEFAULT_VERSION}**" in doc
    run = (ROOT / "scripts" / "vllm-gpu-run.sh").read_text()
    assert "vllm_wheelhouse.py store" in run and "--steps" in run and "zz_gpu_image.pth" in run
