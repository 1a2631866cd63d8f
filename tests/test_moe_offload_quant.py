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
