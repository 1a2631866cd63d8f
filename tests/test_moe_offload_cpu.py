"""Routed experts computed by the CPU, and a token's misses split between the CPU and the GPU.

What must hold: the compiled CPU kernel (cpu_experts.c) gives the weighted expert sum of the
reference dequantization, for our symmetric bf16 experts and an int4 checkpoint's (zero points,
fp16 scales), in its vector path (the native build and, on purpose, AVX2) and its
scalar path (groups whose half is not a multiple of 16 bytes, and the portable build a compiler
without -march=native gets), at random shapes (the 80B widths too), odd expert counts, 1 and 3
threads and any split of a token's experts between the kernel and the rest; so does its torch
fallback, asked for or for want of a compiler; the eager CPU decode path with the kernel
generates the torch path's tokens; the hybrid split (the GPU side run by Triton's interpreter,
the CPU side served in step) gives the reference logits for any share of the misses, all-CPU and
all-PCIe included, and counts each expert on the pipe that served it; and the kernel's benchmark
writes its rates next to the memory's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moechat.backends.demo import build_tiny_model  # noqa: E402
from moechat.backends.moe_offload.build import load_engine  # noqa: E402
from moechat.backends.moe_offload.cpu import CpuExperts, reference_layer  # noqa: E402
from moechat.backends.moe_offload.engine import Options, Sampler  # noqa: E402
from moechat.backends.moe_offload.store import ExpertStore  # noqa: E402

TOL = 1e-4
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cpu") / "wide", "qwen3_next", seed=5,
                            num_experts=16, num_experts_per_tok=4)


def engine(folder, tmp_path, **kw):
    opts = dict(expert_format="int4", int4_group_size=16, device="cpu", dtype=torch.float32,
                cache_dir=tmp_path / "cache")
    opts.update(kw)
    return load_engine(folder, Options(**opts))


LAYOUTS = ["ours", "zero-points-fp16", "fp16"]


def random_store(hidden, inter, group, experts, layers=(3, 5), seed=0, layout="ours"):
    """Our symmetric bf16 experts (``ours``), or an int4 checkpoint's as they are kept: zero points
    0..16 with fp16 scales (asymmetric GPTQ), or fp16 scales alone (symmetric GPTQ)."""
    g = torch.Generator().manual_seed(seed)
    zero = layout == "zero-points-fp16"
    store = ExpertStore("int4", layers, experts, hidden, inter, torch.float32, group=group, zero=zero,
                        scale_dtype=torch.bfloat16 if layout == "ours" else torch.float16)
    for layer in layers:
        for e in range(experts):
            for proj, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
                if layout == "ours":
                    store.put(layer, e, proj, torch.randn(rows, cols, generator=g) * 0.05)
                    continue
                q = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
                s = (torch.rand(rows, cols // group, generator=g) * 0.01 + 1e-3).to(torch.float16)
                z = torch.randint(0, 17 if zero else 9, (rows, cols // group), generator=g, dtype=torch.uint8)
                store.put_int4(layer, e, proj, q, s, z if zero else torch.full_like(z, 8), group)
    assert (store.layers[layers[0]]["down"].zero is not None) == zero
    return store


def assert_reference_sums(cpu, store, layers, g, counts):
    for moe, layer in enumerate(layers):
        for n in counts:
            ids = torch.randperm(store.num_experts, generator=g)[:n].int()
            w = torch.rand(n, generator=g)
            x = torch.randn(store.hidden, generator=g)
            want = reference_layer(store, layer, x, ids, w)
            got = cpu.layer(moe, x, ids, w)
            assert got.shape == (store.hidden,) and torch.isfinite(got).all()
            assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), (n, layer)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-fallback"])
def test_cpu_kernel_gives_the_reference_dequantized_sum(tmp_path, compiled, layout):
    if compiled and not HAS_CC:
        pytest.skip("no C compiler here")
    store = random_store(256, 128, 64, 12, layout=layout)
    cpu = CpuExperts(store, (3, 5), threads=2, cache_dir=tmp_path, compiled=compiled)
    assert cpu.compiled == compiled
    # a row split that does not divide evenly among the threads too
    assert_reference_sums(cpu, store, (3, 5), torch.Generator().manual_seed(1), (1, 4, 10))
    cpu.close()


# (hidden, intermediate, group): the vector path (a group's half a multiple of 16 bytes) at the
# 80B model's widths and at odd small ones, and the scalar path (groups of 16 and 48)
SHAPES = [(2048, 512, 128), (384, 96, 32), (192, 160, 32), (96, 48, 16), (144, 96, 48)]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
@pytest.mark.parametrize("hidden,inter,group", SHAPES, ids=[f"{h}x{i}g{g}" for h, i, g in SHAPES])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["ours", "zero-points-fp16"])
def test_cpu_kernel_matches_the_reference_for_any_shape_count_and_threads(tmp_path, hidden, inter, group, threads,
                                                                          layout):
    experts = 5 if hidden >= 2048 else 13
    store = random_store(hidden, inter, group, experts, seed=hidden + inter + group, layout=layout)
    cpu = CpuExperts(store, (3, 5), threads=threads, cache_dir=tmp_path)
    assert cpu.compiled
    assert_reference_sums(cpu, store, (3, 5), torch.Generator().manual_seed(threads), (0, 1, 3, experts))
    cpu.close()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_any_split_of_a_tokens_experts_between_the_cpu_and_the_rest_sums_to_the_reference(tmp_path):
    store = random_store(384, 96, 32, 11, layers=(0,))
    cpu = CpuExperts(store, (0,), threads=2, cache_dir=tmp_path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(store.hidden, generator=g)
    ids = torch.randperm(11, generator=g)[:9].int()
    w = torch.rand(9, generator=g)
    want = reference_layer(store, 0, x, ids, w)
    for _ in range(6):
        on_cpu = torch.rand(9, generator=g) < 0.5           # the CPU's share; the rest elsewhere
        got = cpu.layer(0, x, ids[on_cpu], w[on_cpu]) + reference_layer(store, 0, x, ids[~on_cpu], w[~on_cpu])
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
    cpu.close()


def fake_cc(tmp_path, case: str) -> str:
    """A C compiler that handles each argument by the shell ``case`` arms given (``refuse``: fail
    with a message) and is cc otherwise."""
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\nrefuse() { echo 'unknown option' >&2; exit 1; }\nargs=''\n"
                      f"for a in \"$@\"; do case \"$a\" in {case};; *) args=\"$args $a\";; esac; done\n"
                      f"exec {real} $args\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_a_compiler_without_march_native_gets_the_portable_build(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_cc(tmp_path, "-march=*) refuse"))
    for layout in ("ours", "zero-points-fp16"):
        store = random_store(384, 96, 32, 7, layout=layout)
        cpu = CpuExperts(store, (3, 5), threads=2, cache_dir=tmp_path / "cache")
        assert cpu.compiled and "portable build" in cpu.why, cpu.why
        assert_reference_sums(cpu, store, (3, 5), torch.Generator().manual_seed(2), (1, 7))
        cpu.close()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_a_native_build_is_never_reused_on_another_processor(tmp_path, monkeypatch):
    from moechat.backends.moe_offload import cpu as cpu_module

    store = random_store(384, 96, 32, 3, layers=(0,))
    folder = tmp_path / "cache"
    CpuExperts(store, (0,), threads=1, cache_dir=folder).close()
    CpuExperts(store, (0,), threads=1, cache_dir=folder).close()          # the same machine: reused
    assert len(list((folder / "kernels").glob("*.so"))) == 1
    monkeypatch.setattr(cpu_module, "_machine_key", lambda: "another model name\nflags : sse2\n")
    CpuExperts(store, (0,), threads=1, cache_dir=folder).close()          # a shared cache, another CPU
    assert len(list((folder / "kernels").glob("*.so"))) == 2


def has_cpu_flag(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and f" {flag}" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.mark.skipif(not (HAS_CC and has_cpu_flag("avx2") and has_cpu_flag("fma")), reason="no AVX2 here")
def test_the_avx2_widening_gives_the_reference_sums(tmp_path, monkeypatch):
    # the native build here may be AVX-512: build the AVX2 path on purpose
    monkeypatch.setenv("CC", fake_cc(tmp_path, '-march=*) args="$args -mavx2 -mfma"'))
    for layout in ("ours", "zero-points-fp16"):
        store = random_store(384, 96, 32, 7, layout=layout)
        cpu = CpuExperts(store, (3, 5), threads=3, cache_dir=tmp_path / "cache")
        assert cpu.compiled and cpu.why.startswith("compiled kernel (native build, AVX2)"), cpu.why
        assert_reference_sums(cpu, store, (3, 5), torch.Generator().manual_seed(4), (1, 7))
        cpu.close()


def test_without_a_working_compiler_the_torch_path_gives_the_same_sums(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    store = random_store(384, 96, 32, 7)
    cpu = CpuExperts(store, (3, 5), threads=2, cache_dir=tmp_path / "cache")
    assert not cpu.compiled and "torch is used" in cpu.why, cpu.why
    assert_reference_sums(cpu, store, (3, 5), torch.Generator().manual_seed(2), (1, 7))
    cpu.close()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_eager_cpu_decode_with_the_kernel_generates_the_torch_paths_tokens(wide, tmp_path):
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(7))[0].tolist()
    eng = engine(wide, tmp_path, cache_experts=0, miss_policy="cpu")
    assert eng.experts[0].cpu_kernel is not None and eng.cpu_experts.compiled
    got = list(eng.generate_ids(ids, Sampler(0.0), 10, set()))
    for mod in eng.experts:
        mod.cpu_kernel = None            # the torch path: dequantize, two products
    want = list(eng.generate_ids(ids, Sampler(0.0), 10, set()))
    assert got == want


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"   # conftest: the kernels run on the CPU
    from moechat.backends.moe_offload import kernels as k
    return k


@pytest.mark.parametrize("share,switch", [(0.0, False), (0.5, False), (1.0, False), (0.5, True)],
                         ids=["all-pcie", "half", "all-cpu", "auto-switch"])
@torch.inference_mode()
def test_hybrid_split_gives_the_reference_logits_for_any_share(wide, tmp_path, kernels, share, switch):
    from moechat.backends.moe_offload.cache import CachePolicy, DeviceExperts
    from moechat.backends.moe_offload.decode import Qwen3NextDecoder
    from moechat.backends.moe_offload.hybrid import HybridMisses

    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(9))
    # group 32: the kernel's vector path (the eager test below keeps group 16, its scalar path)
    eng = engine(wide, tmp_path, cache_experts=6, miss_policy="copy", int4_group_size=32)
    shapes = eng.adapter.shapes(eng.config)
    layers = shapes.moe_layers

    def decoder(routed):
        dec = Qwen3NextDecoder(eng.model, eng.config, 64, routed, layers, fused=True)
        dec.load_cache(eng.forward(ids, None, logits_to_keep=1)[1], ids.shape[1])
        return dec

    # the reference: every miss read by the GPU kernel, no swaps (the same cache all along)
    plain = DeviceExperts(eng.experts, eng.counters, CachePolicy(len(layers), 16, max_swaps=0))
    ref = decoder(plain)
    cpu = CpuExperts(eng.store, layers, threads=2, cache_dir=tmp_path / "k", compiled=HAS_CC)
    # auto-switch: the CPU only while a layer misses at least 5 of its 4 experts on average: never
    hybrid = HybridMisses(cpu, len(layers), shapes.top_k, torch.device("cpu"), eng.store.expert_bytes(), share,
                          min_misses=5 if switch else 1)
    dev = DeviceExperts(eng.experts, eng.counters, CachePolicy(len(layers), 16, max_swaps=0), hybrid=hybrid,
                        switch=switch)
    dec = decoder(dev)
    plain.sync_table()      # after both prefills, which copied experts into the cache
    dev.sync_table()
    eng.counters.reset()
    tok = int(ids[0, -1])
    for _ in range(6):
        ref.token.fill_(tok)
        dec.token.fill_(tok)
        want = ref.step().clone()
        dev.before_token()
        got = dec.step()
        dev.after_token(dec.routing)
        assert (got - want).abs().max().item() <= TOL
        tok = int(want.argmax())
    c = eng.counters
    assert c.misses > 0 and c.cpu_experts + c.zero_copy_experts == c.misses
    if switch:      # the first token's step has the hand-over (empty: too few misses), then none
        assert not dev.hybrid_on and c.hybrid_tokens == 1 and c.zero_copy_experts == c.misses
    elif share == 0.0:
        assert c.cpu_experts == 0
    elif share == 1.0:
        assert c.zero_copy_experts == 0
    else:
        assert 0 < c.cpu_experts < c.misses
    cpu.close()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_the_kernel_benchmark_writes_its_rates_next_to_the_memorys(tmp_path):
    out = tmp_path / "cpu_experts.json"
    root = Path(__file__).resolve().parent.parent
    baseline = tmp_path / "older_cpu_experts.c"      # a comparison: here the same source, copied
    shutil.copy(root / "backends" / "moe_offload" / "cpu_experts.c", baseline)
    subprocess.run([sys.executable, str(root / "bench" / "cpu_experts_speed.py"), "--threads", "1", "--experts", "1", "3",
                    "--layer-experts", "4", "--calls", "1", "--repeat", "1", "--runs", "2", "--probe-mb", "8",
                    "--baseline", str(baseline), "--out", str(out)],
                   capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(out.read_text())
    assert data["producer"] == "bench/cpu_experts_speed.py" and data["cpu"] and "commit" in data
    assert data["shapes"]["expert_bytes"] == 1622016                  # 2048 x 512, int4, group 128
    assert [(c["source"], c["threads"], c["experts_per_call"]) for c in data["cases"]] == [
        ("this checkout", 1, 1), ("this checkout", 1, 3), (str(baseline), 1, 1), (str(baseline), 1, 3)]
    for case in data["cases"]:
        assert case["kernel"].startswith("compiled kernel")
        assert case["bytes_per_call"] == case["experts_per_call"] * 1622016
        assert case["gb_s"] > 0 and case["cached_gb_s"] > 0 and case["cpu_read_gb_s"] > 0
        assert case["share_of_read_bw"] == round(case["gb_s"] / case["cpu_read_gb_s"], 3)
        assert case["predicted_bound"] in ("memory", "arithmetic")
