"""Routed experts computed by the CPU, and a token's misses split between the CPU and the GPU.

What must hold: the compiled CPU kernel (cpu_experts.c) gives the weighted expert sum of the
reference dequantization, as does its torch fallback; the eager CPU decode path with the kernel
generates the torch path's tokens; and the hybrid split (the GPU side run by Triton's interpreter,
the CPU side served in step) gives the reference logits for any share of the misses, all-CPU and
all-PCIe included, and counts each expert on the pipe that served it.
"""

from __future__ import annotations

import os
import shutil

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


@pytest.mark.parametrize("layout", ["ours", "zero-points-fp16", "fp16"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-fallback"])
def test_cpu_kernel_gives_the_reference_dequantized_sum(tmp_path, compiled, layout):
    """Our symmetric bf16 experts, and an int4 checkpoint's as they are kept: zero points 0..16
    with fp16 scales (asymmetric GPTQ), or fp16 scales alone (symmetric GPTQ)."""
    if compiled and not HAS_CC:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    hidden, inter, experts, group = 256, 128, 12, 64
    zero = layout == "zero-points-fp16"
    store = ExpertStore("int4", (3, 5), experts, hidden, inter, torch.float32, group=group, zero=zero,
                        scale_dtype=torch.bfloat16 if layout == "ours" else torch.float16)
    for layer in (3, 5):
        for e in range(experts):
            for proj, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
                if layout == "ours":
                    store.put(layer, e, proj, torch.randn(rows, cols, generator=g) * 0.05)
                    continue
                q = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
                s = (torch.rand(rows, cols // group, generator=g) * 0.01 + 1e-3).to(torch.float16)
                z = torch.randint(0, 17 if zero else 9, (rows, cols // group), generator=g, dtype=torch.uint8)
                store.put_int4(layer, e, proj, q, s, z if zero else torch.full_like(z, 8), group)
    assert (store.layers[3]["down"].zero is not None) == zero
    cpu = CpuExperts(store, (3, 5), threads=2, cache_dir=tmp_path, compiled=compiled)
    assert cpu.compiled == compiled
    for moe, layer in enumerate((3, 5)):
        for n in (1, 4, 10):           # a row split that does not divide evenly among the threads too
            ids = torch.randperm(experts, generator=g)[:n].int()
            w = torch.rand(n, generator=g)
            x = torch.randn(hidden, generator=g)
            want = reference_layer(store, layer, x, ids, w)
            got = cpu.layer(moe, x, ids, w)
            assert got.shape == (hidden,) and torch.isfinite(got).all()
            assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
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
    eng = engine(wide, tmp_path, cache_experts=6, miss_policy="copy")
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
