"""bench/llamacpp_gpu.py at tiny shapes on the CPU: the GPU comparison's own path, end to end.

A synthetic checkpoint folder written by our writer, converted by llama.cpp's convert_hf_to_gguf.py
from the llama-cpp-python sdist (downloaded by ``make test``; the test is skipped with a sentence
without it), quantized to Q4_0 by the installed llama-cpp-python, then ``moechat bench`` of
llama.cpp on the GGUF and moe-offload on the checkpoint at one budget, and bench/report.py over
both. Also: a budget keeps the layers that do not fit on the CPU (the plan decides gpu_layers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from moechat.backends import benchmark

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "llamacpp_gpu.py"
spec = importlib.util.spec_from_file_location("llamacpp_gpu", SCRIPT)
llamacpp_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llamacpp_gpu)


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT: where the GPU machine's results go
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=dict(env, MOECHAT_HOME=str(home), MOECHAT_NO_GPU="1", GRADIO_ANALYTICS_ENABLED="False"))


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    """llama.cpp's converter (and its gguf-py) from the sdist, unpacked from the trimmed copy
    ``pack`` would carry: what the GPU machine converts with."""
    sdist = llamacpp_gpu.PACK / "download" / f"{llamacpp_gpu.SDIST}.tar.gz"
    if not sdist.exists():
        pytest.skip(f"{sdist} is missing: `make test` downloads it (or run "
                    "`python bench/llamacpp_gpu.py pack`).")
    out = tmp_path_factory.mktemp("sdist")
    trimmed = llamacpp_gpu.trim_sdist(sdist, out)
    with tarfile.open(trimmed) as tar:
        names = tar.getnames()
        assert not [n for n in names if "/.git/" in n or "/vendor/llama.cpp/models/" in n]
        tar.extractall(out, filter="data")
    src = out / llamacpp_gpu.SDIST / "vendor" / "llama.cpp"
    assert (src / "convert_hf_to_gguf.py").exists() and (src / "ggml" / "src" / "ggml-cuda").is_dir()
    return src


@pytest.fixture(scope="module")
def written(llama_src, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("compare")
    home = work / "home"
    proc = run("gguf", "--model", "synthetic:tiny", "--layers", "2", "--hf", str(work / "hf"), "--gguf",
               str(work / "gguf"), "--llama-src", str(llama_src), home=home)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = work / "results"
    proc = run("compare", "--hf", str(work / "hf"), "--gguf", str(work / "gguf"), "--target", "", "--budgets", "16",
               "--prompt", "16", "--gen", "4", "--repeat", "1", "--bandwidth-mb", "0", "--out", str(results),
               "--set", "moe-offload:int4_group_size=32", "--also", "fake=synthetic:tiny", home=home)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"work": work, "results": results}


def test_the_gguf_is_llama_cpps_qwen3_next_with_the_checkpoints_depth_and_tokenizer(written):
    from tokenizers import Tokenizer

    from moechat_llamacpp import gguf_file

    work = written["work"]
    file = work / "gguf" / "model-Q4_0.gguf"
    g = gguf_file.read(file)
    assert g.architecture == "qwen3next" and g.layers == 2 and g.quantization.startswith("Q4_0")
    assert g.meta["tokenizer.ggml.pre"] == "gpt-2"
    # the converter writes no qwen3next.vocab_size: the plan's logits take the vocabulary from the
    # token embeddings
    assert "qwen3next.vocab_size" not in g.meta
    assert g.vocab_size == json.loads((work / "hf" / "config.json").read_text())["vocab_size"]
    assert json.loads((work / "gguf" / "moechat_synthetic.json").read_text()) == \
        json.loads((work / "hf" / "moechat_synthetic.json").read_text())
    assert not list(work.glob("*.gguf")), "the unquantized GGUF is deleted"
    # llama.cpp splits text into the same tokens as the checkpoint's own tokenizer: the "gpt-2"
    # pre-tokenizer the converter was told is the demo tokenizer's
    text = "Hello there, it's 2026!  Numbers 12345 and   spaces\nnew line's end"
    hf_ids = Tokenizer.from_file(str(work / "hf" / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    # in a process of its own, as the backend's worker runs llama.cpp (here, next to torch and the
    # rest of the suite's libraries, loading it crashed once)
    code = ("import json, sys, llama_cpp\n"
            "llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "print(json.dumps(llm.tokenize(sys.argv[2].encode(), add_bos=False, special=False)))\n")
    done = subprocess.run([sys.executable, "-c", code, str(file), text], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == hf_ids


def test_both_backends_ran_on_the_same_weights_and_budget_and_the_report_shows_both(written):
    folder, = written["results"].glob("compare-*-llamacpp")
    cases = {c.backend: c for p in folder.glob("*.json") for c in benchmark.read(p).cases}
    # --also put a third backend (vllm on the GPU machine) into the same run, on its own model
    assert set(cases) == {"llama.cpp", "moe-offload", "fake"}
    assert cases["fake"].error is None and cases["fake"].model == "synthetic:tiny"
    del cases["fake"]
    for c in cases.values():
        assert c.error is None and c.decode_tok_s.median > 0 and c.completion_tokens == 4
        # written from synthetic:tiny?layers=2 of 4: both extrapolate to 4 layers
        assert (c.layers, c.full_layers) == (2, 4) and c.extrapolated.layers == 4
    assert cases["llama.cpp"].detail["load_info"]["architecture"] == "qwen3next"
    # the GGUF's budget stands for the same card as the checkpoint's (the same shapes scaled)
    assert cases["llama.cpp"].vram_budget_applied_gb == cases["moe-offload"].vram_budget_applied_gb
    report = (folder / "BENCHMARKS.md").read_text()
    assert "llama.cpp" in report and "moe-offload" in report
    assert not list(written["results"].glob("*.md")), "the report is written next to the results"


def test_a_budget_keeps_the_layers_that_do_not_fit_on_the_cpu(written, monkeypatch):
    import moechat_llamacpp
    from moechat.backends.machine import Gpu, Machine
    from moechat.webui.commands.bench import gpu_layers_within

    monkeypatch.setattr(moechat_llamacpp, "gpu_build", lambda: True)
    model = moechat_llamacpp.gguf_file.model_info(written["work"] / "gguf")
    cls = moechat_llamacpp.LlamaCppBackend
    settings = {"model": model.path, "max_context": 64}

    def card(size: float) -> Machine:
        return Machine(gpus=[Gpu(0, "card", int(size), 0)], host_total=10**12, host_available=10**12)

    big = card(10**12)

    def gpu_bytes(n: int) -> int:
        return cls.plan(model, cls.Settings.model_validate(dict(settings, gpu_layers=n)), big).gpu_bytes

    assert gpu_layers_within(cls, model, settings, big) == -1
    # llama.cpp's gpu_layers counts the output layer first: 1 is it alone, 2 adds the last block
    output, last, every = gpu_bytes(1), gpu_bytes(2), gpu_bytes(-1)
    assert output < last < every
    assert gpu_layers_within(cls, model, settings, card((last + every) // 2)) == 2
    assert gpu_layers_within(cls, model, settings, card((output + last) // 2)) == 1
    assert gpu_layers_within(cls, model, settings, card(1)) == 0

    # the GGUF has 2 of the model's 4 blocks: a card that holds the output layer and `held` of the
    # full model's blocks gets the same share of the 2, rounded down (a whole block of the cut
    # model stands for 2 of the full one's): never more than the card holds, and more for a bigger card
    per_block = last - output
    chosen = []
    for held in (0.5, 1.9, 2.0, 2.5, 3.9):
        n = gpu_layers_within(cls, model, settings, card(output + held * per_block), depth=2.0)
        assert n == (1 if held < 2 else 2), held
        assert (n - 1) * 2 <= held
        chosen.append(n)
    assert chosen == sorted(chosen)
    assert gpu_layers_within(cls, model, settings, card(output // 2), depth=2.0) == 0
    assert gpu_layers_within(cls, model, settings, card(every + 2 * per_block), depth=2.0) == -1
