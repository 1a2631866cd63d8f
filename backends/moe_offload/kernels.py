"""Triton kernels for routed experts at decode: int4 weights read where they lie, never copied.

``int4_expert_gemv`` computes, for each of a token's ``top_k`` experts, ``y[j] = W_e @ x[j]``
straight from the packed int4 bytes and bf16 group scales (the layout of ``quant.py``). A device
table gives each expert's cache slot; an expert with no slot (-1) is read from the host store in
pinned memory, which the GPU addresses directly (unified virtual addressing), so a miss costs its
bytes over PCIe once and no copy, no host sync and no Python. That keeps the whole decode step a
fixed sequence of kernels a CUDA graph can replay.

Importing this module imports triton; the engine imports it only when it runs the GPU path. The
tests run the same kernels on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemv(x_ptr, x_stride, ids_ptr, table_ptr,
               cache_q, cache_s, host_q, host_s, y_ptr,
               OUT: tl.constexpr, IN: tl.constexpr, G: tl.constexpr, BN: tl.constexpr):
    j = tl.program_id(0)                 # which of the token's experts
    nb = tl.program_id(1)                # which block of output rows
    e = tl.load(ids_ptr + j).to(tl.int64)
    slot = tl.load(table_ptr + e).to(tl.int64)
    hit = slot >= 0
    miss = slot < 0
    HALF: tl.constexpr = G // 2          # packed bytes per group and row
    NG: tl.constexpr = IN // G
    rows = nb * BN + tl.arange(0, BN)
    cols = tl.arange(0, HALF)
    in_rows = rows < OUT
    # both bases are computed; the masks make sure only one is ever read
    qc = cache_q + slot * (OUT * (IN // 2))
    qh = host_q + e * (OUT * (IN // 2))
    sc = cache_s + slot * (OUT * NG)
    sh = host_s + e * (OUT * NG)
    xrow = x_ptr + j * x_stride
    acc = tl.zeros([BN], dtype=tl.float32)
    for gi in range(NG):
        off = rows[:, None] * (IN // 2) + gi * HALF + cols[None, :]
        m = in_rows[:, None]
        p = tl.load(qc + off, mask=m & hit, other=0) | tl.load(qh + off, mask=m & miss, other=0)
        lo = (p & 15).to(tl.float32) - 8.0
        hi = (p >> 4).to(tl.float32) - 8.0
        xe = tl.load(xrow + gi * G + 2 * cols).to(tl.float32)
        xo = tl.load(xrow + gi * G + 2 * cols + 1).to(tl.float32)
        part = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
        soff = rows * NG + gi
        s = (tl.load(sc + soff, mask=in_rows & hit, other=0.0).to(tl.float32)
             + tl.load(sh + soff, mask=in_rows & miss, other=0.0).to(tl.float32))
        acc += part * s
    tl.store(y_ptr + j * OUT + rows, acc, mask=in_rows)


def int4_expert_gemv(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                     cache_q: torch.Tensor, cache_s: torch.Tensor, host_q: torch.Tensor, host_s: torch.Tensor,
                     out: torch.Tensor | None = None, block_rows: int = 16) -> torch.Tensor:
    """``y [top_k, R]`` (float32) = expert ``ids[j]``'s int4 matrix [R, C] times ``x[j]`` (or ``x``
    for all when it is 1-D). ``table[e]`` is e's row in ``cache_q/cache_s`` or -1 for the host
    store ``host_q/host_s`` ([E, R, C/2] uint8 and [E, R, C/group] bf16)."""
    k = ids.shape[0]
    r, half = host_q.shape[1:]
    c = 2 * half
    group = c // host_s.shape[2]
    y = out if out is not None else torch.empty(k, r, dtype=torch.float32, device=x.device)
    x_stride = 0 if x.dim() == 1 else x.stride(0)
    grid = (k, triton.cdiv(r, block_rows))
    _int4_gemv[grid](x, x_stride, ids, table, cache_q, cache_s, host_q, host_s, y,
                     OUT=r, IN=c, G=group, BN=block_rows)
    return y
