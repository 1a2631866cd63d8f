"""Model folders: what inspect reads from a good one, and the sentence for each bad one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from moechat.backends.api import BackendError
from moechat.backends.manager import BackendManager
from moechat.backends.modelinfo import inspect
from moechat.backends.plugins import get_plugin_manager


@pytest.fixture
def copy_of(tiny_models, tmp_path):
    def make(family="qwen3_next"):
        dst = tmp_path / f"copy-{family}"
        shutil.copytree(tiny_models[family], dst)
        return dst
    return make


def test_inspect_reads_a_good_folder(tiny_models):
    import torch
    from safetensors.torch import load_file

    info = inspect(tiny_models["qwen3_next"])
    tensors = load_file(tiny_models["qwen3_next"] / "model.safetensors")
    assert info.param_count == sum(t.numel() for t in tensors.values())
    assert info.weight_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (info.model_type, info.architecture) == ("qwen3_next", "Qwen3NextForCausalLM")
    assert (info.num_experts, info.experts_per_token, info.num_layers) == (8, 2, 4)
    assert info.dtype == "F32" and info.quantization is None
    assert tensors and torch is not None


def break_folder(folder, how):
    if how == "no config":
        (folder / "config.json").unlink()
    elif how == "bad json":
        (folder / "config.json").write_text("{not json")
    elif how == "unknown architecture":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "frobnicator"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif how == "truncated shard":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "missing shard":
        weights = (folder / "model.safetensors")
        header_len = int.from_bytes(weights.read_bytes()[:8], "little")
        names = json.loads(weights.read_bytes()[8:8 + header_len])
        index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in names if k != "__metadata__"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "no weights":
        (folder / "model.safetensors").unlink()


SENTENCES = {
    "no config": "has no config.json",
    "bad json": "config.json is not valid JSON",
    "unknown architecture": "model_type 'frobnicator', an architecture moechat's backends do not know",
    "no tokenizer": "has no tokenizer",
    "truncated shard": "model.safetensors is truncated",
    "missing shard": "model-00002-of-00002.safetensors is missing",
    "no weights": "has no .safetensors weights",
}


@pytest.mark.parametrize("how", list(SENTENCES))
def test_bad_folder_gets_one_sentence_naming_the_problem(copy_of, how):
    folder = copy_of()
    break_folder(folder, how)
    with pytest.raises(BackendError) as err:
        inspect(folder)
    assert SENTENCES[how] in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        inspect(tmp_path / "nowhere")


def test_loading_a_bad_folder_keeps_what_was_loaded(copy_of, tmp_path):
    folder = copy_of()
    break_folder(folder, "truncated shard")
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        manager.load("fake", {})
        worker = manager._worker
        with pytest.raises(BackendError, match="truncated"):
            manager.load("transformers", {"model": str(folder)})
        # the model that was loaded stays loaded and usable
        assert manager.state.ready and manager.state.backend == "fake"
        assert manager._worker is worker and worker.alive
    finally:
        manager.close()


def test_inspect_cli(tiny_models, copy_of):
    ok = subprocess.run([sys.executable, "-m", "moechat.webui.cli", "inspect", str(tiny_models["qwen3_moe"]), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["model_type"] == "qwen3_moe" and info["suggested_backend"] == "transformers"
    folder = copy_of()
    break_folder(folder, "no tokenizer")
    bad = subprocess.run([sys.executable, "-m", "moechat.webui.cli", "inspect", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "has no tokenizer" in bad.stderr and "Traceback" not in bad.stderr
