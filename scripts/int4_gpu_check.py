"""Check the int4 Triton kernels on a real GPU: symmetric bf16 experts, and an int4 checkpoint's
experts with zero points and fp16 scales (the tests run the same kernels under Triton's CPU
interpreter only).

    python scripts/int4_gpu_check.py        # on a CUDA machine, from the repository root

For both layouts at Qwen3-Next's expert shapes it compares ``int4_expert_gemv`` (cached and
host experts, plain and activated input) and ``int4_dequantize_rows`` with the reference
dequantization, and prints each gemv's time per call, so the symmetric path's speed can be
compared with an earlier commit's run of this script. Exits 1 when a result is off.
"""

from __future__ import annotations

import sys

import torch

from moechat.backends import synthetic
from moechat.backends.moe_offload import MoeOffloadSettings, kernels, quant
from moechat.backends.shapes import shapes

# Qwen3-Next-80B-A3B's expert shapes (hidden, expert width, top_k), moe-offload's default int4
# group, and 64 experts of a layer
_S = shapes(synthetic.config("synthetic:qwen3-next-80b-a3b"))
E, H, I, K = 64, _S.hidden, _S.expert_intermediate, _S.experts_per_token
G = MoeOffloadSettings.model_fields["int4_group_size"].default


def layouts(g: torch.Generator):
    w = torch.randn(E, 2 * I, H, generator=g) * 0.02
    q, s = quant.int4_quantize(w, G)
    yield "symmetric bf16", q, s, None
    q = torch.randint(0, 256, (E, 2 * I, H // 2), generator=g, dtype=torch.uint8)
    s = (torch.rand(E, 2 * I, H // G, generator=g) * 0.004 + 0.001).to(torch.float16)
    z = torch.randint(0, 17, (E, 2 * I, H // G), generator=g, dtype=torch.uint8)
    yield "zero points, fp16 scales", q, s, z


def timed(fn, reps: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000   # microseconds


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine")
        return 1
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    ok = True
    for name, q, s, z in layouts(g):
        host_q, host_s = q.pin_memory(), s.pin_memory()
        host_z = z.pin_memory() if z is not None else None
        cache = [t[:16].to(dev) if t is not None else None for t in (q, s, z)]
        table = torch.full((E,), -1, dtype=torch.int32)
        table[:16] = torch.arange(16, dtype=torch.int32)
        table = table.to(dev)
        ids = torch.tensor([3, 20, 7, 40, 11, 63, 0, 33, 15, 50], device=dev)[:K]   # cached and host experts
        x = torch.randn(K, H, generator=g).to(dev, torch.bfloat16)
        zeros = {"cache_z": cache[2], "host_z": host_z} if z is not None else {}
        y = kernels.int4_expert_gemv(x, ids, table, cache[0], cache[1], host_q, host_s, **zeros)
        dense = quant.dequantize("int4", q[ids.cpu()], s[ids.cpu()], torch.float32,
                                 zero=None if z is None else z[ids.cpu()])
        want = torch.einsum("krc,kc->kr", dense, x.float().cpu())
        err = ((y.cpu() - want).abs().max() / want.abs().max()).item()
        rows = torch.tensor([5, 30], device=dev)
        got = kernels.int4_dequantize_rows(host_q, host_s, rows, torch.float32, zero=host_z)
        ref = quant.dequantize("int4", q[rows.cpu()], s[rows.cpu()], torch.float32,
                               zero=None if z is None else z[rows.cpu()])
        dq_ok = torch.equal(got.cpu(), ref)
        us = timed(lambda: kernels.int4_expert_gemv(x, ids, table, cache[0], cache[1], host_q, host_s, **zeros))
        good = err < 1e-3 and dq_ok
        ok &= good
        print(f"{name}: gemv max rel. error {err:.2e}, dequantize exact {dq_ok}, gemv {us:.1f} us/call "
              f"({K} experts [{2 * I}, {H}], cached and in pinned host memory) {'OK' if good else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
