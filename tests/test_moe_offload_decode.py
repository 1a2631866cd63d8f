"""The static decode step and the GPU path's parts, on the CPU.

What must hold: the static step gives transformers' logits token after token; the int4 kernel
(run by Triton's interpreter here) reads cached and host experts to the reference dequantized
product and dequantizes experts to the reference weights; grouped products give each group's
expert's product; the whole device-experts path (slot table, kernel, cache policy swapping experts
between tokens) generates the tokens of the eager path; and the cache policy keeps hot experts
where LRU churns.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moechat.backends.demo import build_tiny_model  # noqa: E402
from moechat.backends.moe_offload import quant  # noqa: E402
from moechat.backends.moe_offload.build import load_engine  # noqa: E402
from moechat.backends.moe_offload.cache import CachePolicy, simulate  # noqa: E402
from moechat.backends.moe_offload.engine import Options, Sampler  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("decode") / "wide", "qwen3_next", seed=5,
                            num_experts=16, num_experts_per_tok=4)


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"   # conftest: the kernels run on the CPU
    from moechat.backends.moe_offload import kernels as k
    return k


def engine(folder, tmp_path, **kw):
    opts = dict(expert_format="none", device="cpu", dtype=torch.float32, cache_dir=tmp_path / "cache")
    opts.update(kw)
    return load_engine(folder, Options(**opts))


def test_static_step_gives_transformers_logits_token_after_token(wide, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits[0]
    eng = engine(wide, tmp_path)
    assert eng.decode_path.kind == "eager" and eng.info["decode_path"] == "eager"
    _, cache = eng.forward(ids[:, :8], None, logits_to_keep=1)
    step = eng.decode_path.start(cache, 8)
    got = [step(int(t)) for t in ids[0, 8:]]
    assert (torch.stack(got[:-1]) - want[8:-1]).abs().max().item() <= TOL


def test_int4_kernel_reads_cached_and_host_experts_to_the_reference_product(kernels):
    g = torch.Generator().manual_seed(0)
    experts, rows, cols, group = 12, 48, 256, 64
    q, s = quant.int4_quantize(torch.randn(experts, rows, cols, generator=g) * 0.02, group)
    cache_q = torch.zeros(4, rows, cols // 2, dtype=torch.uint8)
    cache_s = torch.zeros(4, rows, cols // group, dtype=torch.bfloat16)
    table = torch.full((experts,), -1, dtype=torch.int32)
    for slot, e in enumerate((3, 7, 1)):
        cache_q[slot], cache_s[slot], table[e] = q[e], s[e], slot
    ids = torch.tensor([7, 2, 3, 11])                       # two cached, two on the host
    dense = quant.dequantize("int4", q[ids], s[ids], torch.float32)
    x = torch.randn(4, cols, generator=g).to(torch.bfloat16)
    y = kernels.int4_expert_gemv(x, ids, table, cache_q, cache_s, q, s)
    assert (y - torch.einsum("krc,kc->kr", dense, x.float())).abs().max().item() < 1e-4
    shared = kernels.int4_expert_gemv(x[0], ids, table, cache_q, cache_s, q, s, block_rows=32)
    assert (shared - dense @ x[0].float()).abs().max().item() < 1e-4
    # a stale cache slot would give other numbers: the table is what decides
    cache_q[1] = q[0]
    assert (kernels.int4_expert_gemv(x, ids, table, cache_q, cache_s, q, s) - y).abs().max().item() > 1e-3


def test_int4_dequant_kernel_gives_the_reference_weights(kernels):
    g = torch.Generator().manual_seed(1)
    q, s = quant.int4_quantize(torch.randn(6, 40, 384, generator=g), 128)   # 40 rows: a partial block
    rows = torch.tensor([4, 1, 4])
    got = kernels.int4_dequantize_rows(q, s, rows, torch.float32, block_rows=16, block_bytes=64)
    assert torch.equal(got, quant.dequantize("int4", q[rows], s[rows], torch.float32))
    # a slice (a streamed prefill's ring slot: a view at an offset) is read from its own start
    got = kernels.int4_dequantize_rows(q[2:5], s[2:5], torch.tensor([2, 0]), torch.float32)
    assert torch.equal(got, quant.dequantize("int4", q[[4, 2]], s[[4, 2]], torch.float32))
    # bf16: the same float32 product rounded once (the interpreter truncates where the GPU rounds)
    half = kernels.int4_dequantize_rows(q, s, rows, torch.bfloat16)
    want = quant.dequantize("int4", q[rows], s[rows], torch.bfloat16).float()
    assert ((half.float() - want).abs() <= want.abs() * 2**-7).all()


def random_asymmetric_int4(g, experts, rows, cols, group):
    """int4 experts as an asymmetric checkpoint has them: any nibbles, zero points 0..16 (GPTQ
    v1's stored zero + 1 reaches 16), fp16 scales."""
    q = torch.randint(0, 256, (experts, rows, cols // 2), generator=g, dtype=torch.uint8)
    s = (torch.rand(experts, rows, cols // group, generator=g) * 0.01 + 0.001).to(torch.float16)
    z = torch.randint(0, 17, (experts, rows, cols // group), generator=g, dtype=torch.uint8)
    return q, s, z


def test_int4_kernels_read_zero_points_and_fp16_scales(kernels):
    g = torch.Generator().manual_seed(2)
    experts, rows, cols, group = 10, 40, 256, 32
    q, s, z = random_asymmetric_int4(g, experts, rows, cols, group)
    cache_q, cache_s, cache_z = q[:3].clone(), s[:3].clone(), z[:3].clone()
    table = torch.full((experts,), -1, dtype=torch.int32)
    table[:3] = torch.arange(3, dtype=torch.int32)
    ids = torch.tensor([2, 5, 0, 9])                        # two cached, two on the host
    dense = quant.dequantize("int4", q[ids], s[ids], torch.float32, zero=z[ids])
    # the reference really uses the zero points: with 8 for every group it gives other weights
    assert (dense - quant.dequantize("int4", q[ids], s[ids], torch.float32)).abs().max().item() > 1e-3
    x = torch.randn(4, cols, generator=g).to(torch.bfloat16)
    y = kernels.int4_expert_gemv(x, ids, table, cache_q, cache_s, q, s, cache_z=cache_z, host_z=z)
    want = torch.einsum("krc,kc->kr", dense, x.float())
    assert (y - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-5
    # the activated input (silu(gate) * up) with zero points
    xa = torch.randn(4, 2 * cols, generator=g).to(torch.bfloat16)
    act = torch.nn.functional.silu(xa[:, :cols].float()) * xa[:, cols:].float()
    ya = kernels.int4_expert_gemv(xa, ids, table, cache_q, cache_s, q, s, act=True, cache_z=cache_z, host_z=z)
    want = torch.einsum("krc,kc->kr", dense, act)
    assert (ya - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-5
    rows_ = torch.tensor([7, 1])
    got = kernels.int4_dequantize_rows(q, s, rows_, torch.float32, block_rows=16, block_bytes=64, zero=z)
    assert torch.equal(got, quant.dequantize("int4", q[rows_], s[rows_], torch.float32, zero=z[rows_]))


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["torch-grouped-mm", "per-group"])
def test_grouped_linear_multiplies_each_group_by_its_expert(monkeypatch, grouped_mm):
    from moechat.backends.moe_offload.engine import grouped_linear

    if not grouped_mm:
        monkeypatch.setattr(torch, "_grouped_mm", None, raising=False)
    elif getattr(torch, "_grouped_mm", None) is None:
        pytest.skip("this torch has no grouped GEMM")
    g = torch.Generator().manual_seed(2)
    sizes = [3, 1, 6]
    x, w = torch.randn(10, 32, generator=g), torch.randn(3, 16, 32, generator=g)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    want = torch.cat([x[0:3] @ w[0].T, x[3:4] @ w[1].T, x[4:10] @ w[2].T])
    assert (grouped_linear(x, w, offs, sizes) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-kernels"])
def test_device_experts_path_generates_the_eager_paths_tokens(wide, tmp_path, kernels, fused):
    from moechat.backends.moe_offload.cache import DeviceExperts
    from moechat.backends.moe_offload.decode import Qwen3NextDecoder

    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(9))
    eng = engine(wide, tmp_path, expert_format="int4", int4_group_size=16, cache_experts=6, miss_policy="copy")
    want = list(eng.generate_ids(ids[0].tolist(), Sampler(0.0), 12, set()))
    dev = DeviceExperts(eng.experts, eng.counters, CachePolicy(len(eng.experts), 16, max_swaps=2))
    dec = Qwen3NextDecoder(eng.model, eng.config, 64, dev, eng.adapter.shapes(eng.config).moe_layers, fused=fused)
    logits, cache = eng.forward(ids, None, logits_to_keep=1)
    dec.load_cache(cache, ids.shape[1])
    dev.sync_table()
    eng.counters.reset()
    tok, got = int(logits[0, -1].argmax()), []
    for _ in range(12):
        got.append(tok)
        dec.token.fill_(tok)
        out = dec.step()
        dev.after_token(dec.routing)
        tok = int(out.argmax())
    assert got == want
    c = eng.counters
    assert c.hits + c.misses == 12 * len(eng.experts) * 4 and c.misses == c.zero_copy_experts > 0
    # the table the kernel reads and the slots the modules own agree after the swaps
    for layer, mod in enumerate(eng.experts):
        cached = {e: int(s) for e, s in enumerate(dev.table_host[layer].tolist()) if s >= 0}
        assert cached == dict(mod.lru)
    if fused:   # and the fused kernels give the plain ops' logits, step after step
        plain = Qwen3NextDecoder(eng.model, eng.config, 64, dev, eng.adapter.shapes(eng.config).moe_layers)
        for d in (dec, plain):
            d.load_cache(eng.forward(ids, None, logits_to_keep=1)[1], ids.shape[1])
        dev.sync_table()
        for t in got[:4]:
            dec.token.fill_(t)
            plain.token.fill_(t)
            assert (dec.step() - plain.step()).abs().max().item() <= TOL


def test_cache_policy_keeps_hot_experts_where_lru_churns():
    g = torch.Generator().manual_seed(1)
    layers, experts, top_k, slots, tokens = 4, 64, 4, 16, 600
    # a skewed routing: a few hot experts per layer, the rest picked uniformly
    weights = torch.ones(experts)
    weights[-8:] = 12.0          # hot experts the cache does not start with
    trace = torch.stack([torch.stack([torch.multinomial(weights, top_k, generator=g) for _ in range(layers)])
                         for _ in range(tokens)])
    lru = simulate(trace, experts, slots, "lru")
    lfu = simulate(trace, experts, slots, "lfu")
    assert lfu["hit_rate"] > lru["hit_rate"] + 0.05
    # LRU copies every miss into the cache; the policy reads misses in place and copies in far
    # fewer experts (the ones it keeps)
    assert lfu["swaps_per_token"] < 0.5 * lru["experts_moved_per_token"]
    # uniform routing: nothing to learn, and (almost) no copies spent trying
    uniform = torch.stack([torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(layers)])
                           for _ in range(tokens)])
    res = simulate(uniform, experts, slots, "lfu")
    assert res["swaps_per_token"] < 0.1
    assert abs(res["hit_rate"] - slots / experts) < 0.06


@pytest.mark.parametrize("pos", [0, 37, 201])
def test_fused_attention_gives_the_plain_ops_output_over_a_long_cache(wide, tmp_path, kernels, pos):
    """The attention kernels (norms, RoPE and the KV write in one; positions split across programs,
    flash-decoding, then reduced with the output gate) against the torch ops, with the cache holding
    more positions than one split reads, so several splits and a partly filled block take part."""
    from moechat.backends.moe_offload.decode import Qwen3NextDecoder

    eng = engine(wide, tmp_path)
    moe_layers = eng.adapter.shapes(eng.config).moe_layers
    plain = Qwen3NextDecoder(eng.model, eng.config, 256, None, moe_layers)
    fused = Qwen3NextDecoder(eng.model, eng.config, 256, None, moe_layers, fused=True)
    g = torch.Generator().manual_seed(11)
    layer = next(lay for lay in fused.layers if lay.kind == "full_attention")
    attn = layer.module.self_attn
    assert layer.proj_in is not None        # q, k and v stacked: the fused path
    for d in (plain, fused):
        d.keys.copy_(torch.randn(d.keys.shape, generator=torch.Generator().manual_seed(12)))
        d.values.copy_(torch.randn(d.values.shape, generator=torch.Generator().manual_seed(13)))
        d.pos.fill_(pos)
    x = torch.randn(eng.config.hidden_size, generator=g)
    want = plain._attention(attn, layer.state, x)
    with torch.no_grad():
        got = fused._fused_attention(layer, x, fused.rope_angles(x))
    assert (got - want).abs().max().item() <= TOL * max(want.abs().max().item(), 1.0)
    # the token's key and value went where the plain ops put them, and nothing else moved
    assert torch.allclose(fused.keys, plain.keys, atol=1e-5) and torch.equal(fused.values, plain.values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_adds_the_moe_output_as_the_plain_ops_do_with_the_shared_expert_computed_inside(kernels, dtype):
    """combine against the plain formulation (``_mlp``'s shared expert times its sigmoid gate, plus
    the routed experts' weighted sum and the CPU's share, added to the residual stream), given the
    shared expert's output or, with ``down``, computing it from its gate and up projections. 200
    outputs and an inner size of 80 read in blocks of 32 leave partial blocks of both. float32
    checks the arithmetic; in bf16 Triton's interpreter truncates (toward zero) at each of the six
    points where the GPU rounds as transformers does, so that case allows a few units in the last
    place of the largest output."""
    from types import SimpleNamespace

    from moechat.backends.moe_offload.decode import _mlp

    F = torch.nn.functional
    g = torch.Generator().manual_seed(3)
    n, inter, k = 200, 80, 4

    def linear(rows, cols):
        return SimpleNamespace(weight=(torch.randn(rows, cols, generator=g) / cols ** 0.5).to(dtype))

    se = SimpleNamespace(gate_proj=linear(inter, n), up_proj=linear(inter, n), down_proj=linear(n, inter))
    x = torch.randn(n, generator=g).to(dtype) * 2
    h0 = (torch.randn(n, generator=g) * 0.25).to(dtype)
    y = torch.randn(k, n, generator=g) * 0.25          # the routed experts' outputs, float32
    w = torch.rand(k, generator=g).to(dtype)
    cpu = torch.randn(n, generator=g) * 0.1
    gate_up = F.linear(x, torch.cat([se.gate_proj.weight, se.up_proj.weight]))
    shared_gate = F.linear(x, linear(1, n).weight)
    routed = ((y * w[:, None].float()).sum(0) + cpu).to(dtype)
    want = (h0 + (routed + _mlp(se, x) * torch.sigmoid(shared_gate))).float()
    top = want.abs().max().item()
    assert (want - (h0 + routed).float()).abs().max().item() > 0.25 * top     # the shared expert counts
    tol = (1e-5 if dtype == torch.float32 else 2**-4) * top
    unfused = h0.clone()
    kernels.combine(unfused, y, w, _mlp(se, x), shared_gate, cpu)
    fused = h0.clone()
    kernels.combine(fused, y, w, gate_up, shared_gate, cpu, down=se.down_proj.weight, block_inner=32)
    for got in (unfused, fused):
        assert (got.float() - want).abs().max().item() <= tol


def route(kernels, logits, k, norm, noise=None):
    ids, record = torch.full((k,), -1), torch.full((k,), -1)
    weights = torch.zeros(k)
    kernels.route(logits, k, norm, ids, weights, record, noise)
    assert torch.equal(ids, record)
    return ids, weights


@pytest.mark.parametrize("norm", [True, False], ids=["renormalised", "as-is"])
def test_router_picks_the_most_probable_experts_and_the_smallest_index_among_ties(kernels, norm):
    # logits in quarter steps: many experts share a probability, and the tenth pick is one of a tie
    e, k = 60, 10                       # 60: the kernel's block of 64 has lanes past the experts
    logits = (torch.randint(0, 6, (e,), generator=torch.Generator().manual_seed(6)) / 4).to(torch.bfloat16)
    probs = torch.softmax(logits, -1, dtype=torch.float)
    order = torch.sort(probs, descending=True, stable=True).indices      # ties: the smaller index first
    assert probs[order[k - 1]] == probs[order[k]] and probs[order[0]] == probs[order[1]]
    ids, weights = route(kernels, logits, k, norm)
    assert ids.tolist() == order[:k].tolist()
    want = probs[order[:k]]
    if norm:
        want = want / want.sum()
    assert (weights - want).abs().max().item() <= 1e-6


def test_router_with_noise_picks_by_the_noise_and_weighs_by_the_probability(kernels):
    e, k = 60, 10
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(e, generator=g).to(torch.bfloat16)
    noise = torch.randint(0, 16, (e,), generator=g) / 16                # ties in the noise too
    order = torch.sort(noise, descending=True, stable=True).indices
    assert noise[order[k - 1]] == noise[order[k]] and noise[order[0]] == noise[order[1]]
    ids, weights = route(kernels, logits, k, False, noise)
    assert ids.tolist() == order[:k].tolist()
    probs = torch.softmax(logits, -1, dtype=torch.float)
    assert (weights - probs[order[:k]]).abs().max().item() <= 1e-6
