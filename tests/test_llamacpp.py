"""The llama.cpp backend plugin (plugins/moechat-llamacpp) on a tiny GGUF made here: the contract
suite, what `moechat plugins / inspect / plan / bench` say about a GGUF, a sentence for each bad
file, Stop during a long prompt, and unload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamacpp_models import QWEN_MERGES, QWEN_VOCAB, qwen_vocab_gguf, tiny_gguf
from moechat.backends.api import BackendError, GenerateRequest
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.testing import BackendContract, chat, collect

MOECHAT = str(Path(sys.executable).parent / "moechat")


def moechat(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([MOECHAT, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MOECHAT_NO_GPU="1", **env))


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-models")
    tiny_gguf(folder)
    return folder


@pytest.fixture(scope="module")
def gguf(gguf_dir) -> Path:
    return gguf_dir / "tiny-llama-q8_0.gguf"


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory) -> Path:
    """A GGUF with a Qwen vocabulary in its header (151,936 tokens, 151,387 merges), tiny tensors."""
    return qwen_vocab_gguf(tmp_path_factory.mktemp("qwen-vocab") / "qwen-vocab.gguf")


@pytest.fixture(scope="module")
def contract_model_dir(gguf_dir, tmp_path_factory) -> Path:
    """The contract suite's model here: a folder that holds one GGUF (a form the setting takes)."""
    folder = tmp_path_factory.mktemp("one-gguf")
    shutil.copy(gguf_dir / "tiny-llama-q8_0.gguf", folder / "model.gguf")
    return folder


class TestLlamaCpp(BackendContract):
    backend = "llama.cpp"

    def test_stats_carry_what_llama_cpp_measured(self, manager):
        # a prompt no earlier test sent, so llama.cpp evaluates all of it (no cached prefix)
        _, last = collect(manager.generate(chat("Numbers: 0 1 2 3", temperature=0, max_new_tokens=6)))
        stats = manager.stats()["backend_stats"]
        assert stats["llama_eval_tokens"] >= last.usage["completion_tokens"] - 1 >= 1
        assert stats["llama_prompt_eval_tokens"] >= 1 and stats["llama_eval_ms"] > 0
        assert stats["llama_decode_tok_s"] > 0 and stats["llama_prefill_tok_s"] > 0
        assert 0 < stats["llama_kv_tokens"] <= stats["llama_n_ctx"] == manager.state.info["context_length"]


def test_plugins_lists_llama_cpp_as_ready():
    out = moechat("plugins", "--json")
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout)["backends"] if r["name"] == "llama.cpp")
    assert row["available"] is True and row["plugin"] == "llama-cpp"


def test_inspect_names_architecture_size_quantization_and_suggests_llama_cpp(gguf):
    out = moechat("inspect", str(gguf))
    assert out.returncode == 0, out.stderr
    assert "llama (llama)" in out.stdout and "Q8_0" in out.stdout and "2 layers" in out.stdout
    assert "suggested backend: llama.cpp" in out.stdout
    info = json.loads(moechat("inspect", str(gguf), "--json").stdout)
    assert info["architecture"] == "llama" and info["quantization"] == "Q8_0"
    assert info["suggested_backend"] == "llama.cpp" and info["path"] == str(gguf.resolve())
    assert 0.8 * gguf.stat().st_size < info["weight_bytes"] < gguf.stat().st_size


def test_the_model_picker_lists_gguf_files(gguf_dir):
    from moechat.webui.models import find_model_folders

    suffixes = get_plugin_manager().model_file_suffixes()
    assert ".gguf" in suffixes
    labels = [m.label for m in find_model_folders(gguf_dir, hf_cache=False, file_suffixes=suffixes)]
    assert "tiny-llama-q8_0.gguf" in labels


def truncated(gguf: Path, out: Path) -> Path:
    out.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    return out


def not_gguf(gguf: Path, out: Path) -> Path:
    out.write_bytes(b"PK\x03\x04 a zip file renamed to .gguf" + bytes(1000))
    return out


def header_cut(gguf: Path, out: Path) -> Path:
    out.write_bytes(gguf.read_bytes()[:200])
    return out


@pytest.mark.parametrize("make, sentence", [
    (not_gguf, "is not a GGUF file"),
    (truncated, "is truncated or damaged"),
    (header_cut, "is truncated or damaged"),
])
def test_a_bad_file_gets_a_sentence_from_inspect_and_from_load(gguf, tmp_path, make, sentence):
    bad = make(gguf, tmp_path / "bad.gguf")
    out = moechat("inspect", str(bad))
    assert out.returncode == 1 and sentence in out.stderr and "Traceback" not in out.stderr
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        with pytest.raises(BackendError, match=sentence):
            manager.load("llama.cpp", {"model": str(bad)})
    finally:
        manager.close()


def gguf_reader_header(path: Path) -> tuple[dict, list, int, dict]:
    """The reference: what gguf.GGUFReader reads from ``path`` (the way gguf_file.read used it):
    scalar metadata and arrays of up to 64 numbers, the tensors, the byte where tensor data ends,
    and the length of every array."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    from moechat_llamacpp.gguf_file import Tensor

    reader = GGUFReader(path)
    meta, lengths = {}, {}
    for name, fld in reader.fields.items():
        if not fld.types or name.startswith("GGUF."):
            continue
        if fld.types[0] == GGUFValueType.ARRAY:
            lengths[name] = len(fld.data)
            if len(fld.data) <= 64 and len(fld.types) > 1 and fld.types[1] != GGUFValueType.STRING:
                meta[name] = [v.item() if isinstance(v, np.generic) else v for v in fld.contents()]
            continue
        value = fld.contents()
        meta[name] = value.item() if isinstance(value, np.generic) else value
    tensors = [Tensor(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    end = max([reader.data_offset] + [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors])
    return meta, tensors, end, lengths


@pytest.mark.parametrize("which", ["gguf", "qwen_gguf"])
def test_the_header_reads_as_the_gguf_package_reads_it(which, request, tmp_path):
    """The converter's tiny Llama and a file with Qwen's vocabulary: the same metadata, tensors
    and end of the tensor data as gguf.GGUFReader; a file that stops one byte before that end is
    truncated, one that stops at it is whole."""
    from moechat_llamacpp import gguf_file

    path = request.getfixturevalue(which)
    meta, tensors, end, lengths = gguf_reader_header(path)
    g = gguf_file.read(path)
    assert g.meta == meta and g.tensors == tensors
    assert all(not isinstance(v, list) or len(v) <= 64 for v in g.meta.values())
    assert g.meta["general.architecture"] in ("llama", "qwen3next")
    if which == "qwen_gguf":
        assert g.meta["qwen3next.attention.head_count_kv"] == [0, 2]  # a small array is kept ...
        assert "qwen3next.test_long" not in g.meta                    # ... a long one is not
        assert "tokenizer.ggml.tokens" not in g.meta and "tokenizer.ggml.merges" not in g.meta
        assert g.meta["qwen3next.test_flag"] is True and g.meta["general.alignment"] == 64
        assert [t.type for t in g.tensors] == ["F16", "F32", "Q8_0", "Q4_K", "F32"]
        assert lengths["tokenizer.ggml.tokens"] == lengths["tokenizer.ggml.token_type"] == QWEN_VOCAB
        assert lengths["tokenizer.ggml.merges"] == QWEN_MERGES
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(path.read_bytes()[:end])
    assert gguf_file.read(whole).tensors == tensors
    short = tmp_path / "short.gguf"
    short.write_bytes(path.read_bytes()[:end - 1])
    with pytest.raises(gguf_file.GgufError, match=f"its tensors need {end:,} bytes but the file has {end - 1:,}"):
        gguf_file.read(short)


@pytest.mark.parametrize("cut", [6, 20, 40, 1_000_001, "tensor infos", "tensor data"])
def test_a_file_cut_anywhere_gets_the_truncated_sentence(qwen_gguf, tmp_path, cut):
    """Cut in the version, the counts, a key, the middle of the vocabulary, the tensor infos or
    the tensor data: always the sentence, never a Python error."""
    from moechat_llamacpp import gguf_file

    data = qwen_gguf.read_bytes()
    infos = data.index(b"token_embd.weight")  # the first tensor info's name
    at = {"tensor infos": infos + 4, "tensor data": len(data) - 100}.get(cut, cut)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:at])
    with pytest.raises(gguf_file.GgufError) as caught:
        gguf_file.read(bad)
    message = str(caught.value)
    assert message.startswith("cut.gguf is truncated or damaged: ") and message.endswith("Copy or download it again.")
    assert ("its header runs past the end of the file" in message) == (cut != "tensor data")


def test_an_architecture_this_llama_cpp_does_not_know_gets_a_sentence(gguf, tmp_path):
    from gguf import GGUFReader

    odd = tmp_path / "odd-arch.gguf"
    shutil.copy(gguf, odd)
    reader = GGUFReader(odd, "r+")
    reader.fields["general.architecture"].parts[-1][:] = list(b"zlama")  # same length; no llama.cpp has it
    reader.data.flush()
    del reader
    assert "zlama (zlama)" in moechat("inspect", str(odd)).stdout
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        with pytest.raises(BackendError, match="does not know the architecture 'zlama' of odd-arch.gguf"):
            manager.load("llama.cpp", {"model": str(odd)})
    finally:
        manager.close()


def test_a_hugging_face_folder_gets_a_sentence(gguf_dir, tmp_path):
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        with pytest.raises(BackendError, match="runs GGUF files, and .*hf-tiny-llama is not a GGUF file"):
            manager.load("llama.cpp", {"model": str(gguf_dir / "hf-tiny-llama")})
    finally:
        manager.close()


def test_a_file_that_does_not_fit_gets_a_plan_and_advice(gguf):
    out = moechat("plan", str(gguf), "--backend", "llama.cpp", "--ram-gb", "0.05", "--set", "max_context=8192")
    assert out.returncode == 3, out.stderr
    assert "weights in host RAM" in out.stdout and "KV cache for 8192 tokens (f16)" in out.stdout
    assert "This does not fit." in out.stdout and "(close other programs), lower max_context" in out.stdout
    fits = moechat("plan", str(gguf), "--backend", "llama.cpp", "--ram-gb", "8")
    assert fits.returncode == 0 and "This fits." in fits.stdout


def test_the_plan_splits_layers_between_gpu_and_ram_as_llama_cpp_does(gguf, monkeypatch):
    """With a GPU build, as llama.cpp places them (llama-model.cpp, i_gpu_start): gpu_layers counts
    the output layer first, then blocks from the end; token embeddings stay in RAM; the logits of a
    batch are computed where the output layer is; a card too small gets the gpu_layers that fits."""
    from gguf import GGUFReader

    import moechat_llamacpp as plugin
    from moechat.backends.machine import Gpu, Machine

    monkeypatch.setattr(plugin, "gpu_build", lambda: True)
    sizes: dict[str, int] = {}
    for t in GGUFReader(gguf).tensors:
        where = t.name.split(".")[1] if t.name.startswith("blk.") else t.name.split(".")[0]
        sizes[where] = sizes.get(where, 0) + int(t.n_bytes)
    model = plugin.gguf_file.model_info(gguf)
    host = 8 * 1024**3
    output_layer = sizes["output_norm"] + sizes["output"]

    def plan(gpu_layers: int, gpu_bytes: int = 16 * 1024**3):
        machine = Machine([Gpu(0, "a test card", gpu_bytes, 0)], host, host, 2)
        return plugin.LlamaCppBackend.plan(model, plugin.LlamaCppSettings(model=model.path, gpu_layers=gpu_layers),
                                           machine)

    def weights(p, device: str) -> int:
        return sum(i.bytes for i in p.items if i.device == device and "weights" in i.what)

    def logits(p) -> tuple[str, int]:
        item, = (i for i in p.items if i.what.startswith("logits"))
        return item.device, item.bytes

    every = plan(-1)
    assert weights(every, "gpu") == sizes["0"] + sizes["1"] + output_layer
    assert weights(every, "host") == sizes["token_embd"]
    assert plan(3).items == every.items  # 2 blocks and the output layer: all of them
    vocab = plugin.gguf_file.read(gguf).vocab_size
    assert logits(every) == ("gpu", 512 * vocab * 4)  # a batch of 512 (n_ubatch), f32
    only_output = plan(1)
    assert weights(only_output, "gpu") == output_layer and logits(only_output)[0] == "gpu"
    two = plan(2)
    assert weights(two, "gpu") == sizes["1"] + output_layer and two.fits
    assert weights(two, "host") == sizes["0"] + sizes["token_embd"]
    none = plan(0)
    assert weights(none, "gpu") == 0 and none.gpu_available is None and logits(none)[0] == "host"
    kv = [i for i in two.items if i.what.startswith("KV cache")]
    assert sorted(i.device for i in kv) == ["gpu", "host"] and kv[0].bytes == kv[1].bytes  # one block each
    # the worker of a GPU build holds the CUDA runtime's host memory too
    on_gpu, on_cpu = (next(i.bytes for i in p.items if i.what.startswith("worker")) for p in (every, none))
    assert on_gpu == plugin.WORKER_GPU_BYTES > on_cpu == plugin.WORKER_BYTES
    small = plan(-1, gpu_bytes=two.gpu_bytes)
    assert not small.fits and "Set gpu_layers to 2 (of 3: 2 blocks and the output layer)" in " ".join(small.advice)


def test_a_quantized_kv_cache_without_flash_attention_is_refused_with_a_sentence(gguf, tmp_path):
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        with pytest.raises(BackendError, match="q8_0 KV cache needs flash attention"):
            manager.load("llama.cpp", {"model": str(gguf), "kv_cache_type": "q8_0"})
    finally:
        manager.close()


def test_stop_lands_between_batches_of_a_long_prompt_and_unload_frees_the_model(gguf):
    """In process: Stop is checked between prompt batches (not only between reply tokens)."""
    from moechat_llamacpp import LlamaCppBackend, LlamaCppSettings

    backend = LlamaCppBackend()
    backend.load(LlamaCppSettings(model=str(gguf), batch_size=16, max_context=2048), lambda p: None)
    checks = []

    def stop_on_third_check() -> bool:
        checks.append(1)
        return len(checks) >= 3

    request = GenerateRequest(prompt="the quick brown fox " * 100)
    chunks = list(backend.generate(request, stop_on_third_check))
    prompt_tokens = next(c.prompt_tokens for c in chunks if c.prompt_tokens)
    assert prompt_tokens > 100
    assert chunks[-1].finish_reason == "cancelled"
    assert sum(c.tokens for c in chunks) == 0 and "".join(c.text for c in chunks) == ""
    assert backend.llm.n_tokens == 32  # two batches of 16, then it stopped
    whole = list(backend.generate(GenerateRequest(prompt="the quick brown fox", sampling={"max_new_tokens": 5,
                                                                                          "temperature": 0}),
                                  lambda: False))
    assert whole[-1].finish_reason == "length" and sum(c.tokens for c in whole) == 5
    backend.unload()
    assert backend.llm is None


def test_bench_measures_llama_cpp_on_a_gguf(gguf, tmp_path):
    path = tmp_path / "bench.json"
    out = moechat("bench", "--backend", "llama.cpp", "--model", str(gguf), "--prompt-tokens", "32",
                  "--gen-tokens", "8", "--repeat", "2", "--warmup", "1", "--bandwidth-mb", "0", "--no-progress",
                  "--json", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    case = json.loads(path.read_text())["cases"][0]
    assert case["backend"] == "llama.cpp" and case["model"] == str(gguf)
    assert case["decode_tok_s"]["median"] > 0 and case["prefill_tok_s"]["median"] > 0
    assert case["backend_stats"]["llama_eval_tokens"] >= 1


def test_a_vram_budget_never_brings_torch_into_the_llama_cpp_worker(gguf, tmp_path, monkeypatch):
    """`moechat bench --vram-budget-gb` caps torch's allocations in the worker; llama.cpp allocates
    its own, and on the GPU machine a torch CUDA context next to llama.cpp's CUDA build killed the
    worker with SIGSEGV. Here torch cannot be imported in the worker at all, and the load still works."""
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text('raise ImportError("torch must not be imported in this worker")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("MOECHAT_VRAM_BUDGET_GB", "16")
    manager = BackendManager(get_plugin_manager(), tmp_path / "home")
    try:
        manager.load("llama.cpp", {"model": str(gguf)})
        text = "".join(c.text for c in manager.generate(chat("Hi", max_new_tokens=4, temperature=0)))
        assert manager.state.info["architecture"] == "llama" and isinstance(text, str)
    finally:
        manager.close()
