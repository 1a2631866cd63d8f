"""Our own int4 conversion: the quantizer the store uses is measured, not assumed.

What must hold: on heavy-tailed weights (Student-t, outlier columns and rows, as bench/quant_error.py
makes them) the default quantizer's weight and output errors are clearly below round-to-nearest's
at the default group, in the same format (so decode reads the same bytes); the default group's
predicted decode cost stays under 5 %; the store converts with the default quantizer; the
benchmark script prints its table. (The kernels and logits on the new quantizer's experts are
held by test_moe_offload.py, test_moe_offload_cpu.py and test_moe_offload_decode.py, which
quantize through ``quant.int4_quantize``.)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from moechat.backends.moe_offload import MoeOffloadSettings, quant  # noqa: E402
from moechat.backends.moe_offload.store import ExpertStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "quant_error.py"
DEFAULT_GROUP = MoeOffloadSettings.model_fields["int4_group_size"].default


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quant_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["student-t", "student-t+outliers", "gaussian"])
def test_default_quantizer_beats_round_to_nearest(bench, kind):
    w = bench.weights(kind, 256, 1024, seed=3)
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(4))
    mse_rtn, out_rtn = bench.errors(w, x, "nearest", DEFAULT_GROUP)
    mse, out = bench.errors(w, x, "search", DEFAULT_GROUP)
    assert mse < 0.8 * mse_rtn and out < 0.92 * out_rtn, (kind, mse, mse_rtn, out, out_rtn)
    # the same format: packed nibbles and one bf16 scale per group, read by the same kernels
    q, s = quant.int4_quantize(w, DEFAULT_GROUP)
    q0, s0 = quant.int4_quantize_rtn(w, DEFAULT_GROUP)
    assert (q.shape, q.dtype, s.shape, s.dtype) == (q0.shape, q0.dtype, s0.shape, s0.dtype)


def test_default_group_costs_under_five_percent_at_decode(bench):
    """Decode is memory-bound on expert bytes: the default's scales add under 5 % to the payload,
    a smaller group would not (so the gain comes from the search, not from more scales)."""
    assert bench.decode_cost(DEFAULT_GROUP) < 0.05
    assert bench.decode_cost(DEFAULT_GROUP // 2) > 0.05
    assert bench.decode_cost(128) == pytest.approx(0.03125)


def test_store_converts_with_the_default_quantizer():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    store = ExpertStore("int4", (0,), 2, 256, 64, torch.float32, group=64)
    for e in range(2):
        for proj in ("gate", "up"):
            store.put(0, e, proj, w)
    q, s = quant.int4_quantize(w, 64)
    p = store.layers[0]["gate_up"]
    assert torch.equal(p.data[1, 64:], q) and torch.equal(p.scale[1, 64:], s)


def test_quant_error_script_prints_the_table(tmp_path):
    out = tmp_path / "q.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "32", "--cols", "256", "--matrices", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("| student-t+outliers | search | 128 |")]
    assert len(lines) == 1 and "+3.12 %" in lines[0]
    assert out.exists()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="converting on the GPU needs one")
def test_a_load_converts_on_the_gpu_as_well_as_on_the_cpu(fp8):
    """build.load_engine converts on the GPU where there is one; the stored experts are as good as
    the CPU's (float32 sums in another order may pick another candidate scale for a few groups)."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    scale = None
    if fp8:
        w, scale = quant.fp8_quantize(w, (128, 128))
    stores = {}
    for where in (None, "cuda"):
        store = ExpertStore("int4", (0,), 1, 256, 64, torch.float32, group=64, convert_on=where)
        store.put(0, 0, "gate", w[:64], scale[:1] if fp8 else None, (128, 128) if fp8 else None)
        stores[where] = store.dense(0, "gate_up", dtype=torch.float32)[0, :64]
    ref = w[:64].float() if not fp8 else quant.fp8_dequantize(w[:64], scale[:1], (128, 128), torch.float32)
    err = {k: float(((v - ref) ** 2).mean()) for k, v in stores.items()}
    assert err["cuda"] <= err[None] * 1.01, err


def test_a_store_converts_on_the_device_it_is_given(monkeypatch):
    """Each checkpoint tensor is quantized where ``convert_on`` says (the GPU during a load); the
    meta device stands in for it here, the bytes stored come back to the host store."""
    seen = []
    real = quant.int4_quantize

    def spy(w, group):
        seen.append(w.device.type)
        return real(torch.zeros(w.shape), group)

    monkeypatch.setattr(quant, "int4_quantize", spy)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7)) * 0.02
    for where, expected in ((None, "cpu"), ("meta", "meta")):
        store = ExpertStore("int4", (0,), 1, 256, 64, torch.float32, group=64, convert_on=where)
        store.put(0, 0, "gate", w)
        assert seen[-1] == expected
        assert store.layers[0]["gate_up"].data.device.type == "cpu"


DEVICES = [None] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("convert_on", DEVICES)
@pytest.mark.parametrize("fmt,zero,scale_dtype", [("int4", False, torch.bfloat16), ("int4", False, torch.float16),
                                                  ("int4", True, torch.bfloat16), ("none", False, torch.bfloat16)])
@pytest.mark.parametrize("fp8", [False, True])
def test_batched_conversion_stores_the_same_bytes_as_one_tensor_at_a_time(monkeypatch, fp8, fmt, zero,
                                                                          scale_dtype, convert_on):
    """A load adds checkpoint tensors (``ExpertStore.add``: converted in batches of many experts of
    one projection) in the checkpoint's order (experts 0, 1, 10, ...; down, gate, up of each);
    every stored byte equals ``put``'s, which converts one tensor at a time, for bf16 and
    block-FP8 tensors, in each store variant (bf16 or fp16 scales, zero points, dense)."""
    from moechat.backends.moe_offload import store as store_mod

    hidden, inter, experts = 256, 128, 11
    g = torch.Generator().manual_seed(11)
    tensors = []
    for e in sorted(range(experts), key=str):
        for proj in ("down", "gate", "up"):
            shape = (hidden, inter) if proj == "down" else (inter, hidden)
            w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
            scale = None
            if fp8:
                w, scale = quant.fp8_quantize(w.float(), (128, 128))
            tensors.append((e, proj, w, scale))
    seen = []
    real = quant.int4_quantize
    monkeypatch.setattr(quant, "int4_quantize", lambda w, group: seen.append(w.shape[0]) or real(w, group))
    # 4 tensors a batch: batches of several experts and remainders that only flush() converts
    monkeypatch.setattr(store_mod, "CONVERT_BATCH_WEIGHTS", {"cuda": 4 * hidden * inter, "cpu": 4 * hidden * inter})
    stores = {}
    for how in ("put", "add"):
        store = ExpertStore(fmt, (0,), experts, hidden, inter, torch.bfloat16, group=64, zero=zero,
                            scale_dtype=scale_dtype, convert_on=convert_on, pin=convert_on == "cuda")
        for e, proj, w, scale in tensors:
            getattr(store, how)(0, e, proj, w, scale, (128, 128) if fp8 else None)
        store.flush()
        store.check_complete()
        stores[how] = store
    if fmt == "int4":
        assert max(seen) == 4 and seen.count(1) == 3 * experts   # batches were made and put's were not
    for proj in ("gate_up", "down"):
        a, b = stores["put"].layers[0][proj], stores["add"].layers[0][proj]
        for name in ("data", "scale", "zero"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            assert x is None or torch.equal(x.view(torch.uint8), y.view(torch.uint8)), (proj, name)
        if zero:
            assert bool((b.zero == 8).all())
    ref = quant.fp8_dequantize(tensors[0][2], tensors[0][3], (128, 128), torch.float32) if fp8 else tensors[0][2]
    e0, proj0 = tensors[0][0], tensors[0][1]
    dense = stores["add"].dense(0, "down", [e0], torch.float32)[0]
    assert proj0 == "down" and float(((dense - ref.float()) ** 2).mean()) < 0.02 * float((ref.float() ** 2).mean())


def test_a_store_with_experts_still_to_convert_is_not_complete():
    store = ExpertStore("int4", (0,), 1, 256, 64, torch.float32, group=64)
    for proj in ("gate", "up", "down"):
        shape = (256, 64) if proj == "down" else (64, 256)
        store.add(0, 0, proj, torch.randn(*shape) * 0.02)
    with pytest.raises(RuntimeError, match="flush"):
        store.check_complete()
    store.flush()
    store.check_complete()


def test_float8_codes_read_on_the_cpu_as_torch_casts_them():
    """The CPU's table lookup (quant.fp8_to_float32) gives every one of the 256 float8 codes the
    value torch's cast gives it (NaN where it is NaN), and dequantization multiplies by the scales."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    got, cast = quant.fp8_to_float32(codes), codes.to(torch.float32)
    assert torch.equal(got.isnan(), cast.isnan()) and torch.equal(got.nan_to_num(), cast.nan_to_num())
    scale = torch.tensor([[0.5, 2.0]])
    dense = quant.fp8_dequantize(codes.reshape(1, 256).expand(2, 256), scale.expand(1, 2), (2, 128), torch.float32)
    expected = cast.reshape(1, 256).expand(2, 256) * torch.tensor([0.5] * 128 + [2.0] * 128)
    assert torch.equal(dense.nan_to_num(), expected.nan_to_num())


def test_convert_speed_script_prints_both_ways(tmp_path):
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "convert_speed.py"), "--experts", "1", "--rounds", "1",
                           "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith(("| fp8 |", "| bf16 |"))]
    assert len(rows) == 4 and sum("one tensor at a time" in r for r in rows) == 2
    assert out.exists()
