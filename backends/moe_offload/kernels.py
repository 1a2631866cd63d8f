"""Triton kernels for routed experts (int4 weights read where they lie) and the fused decode step.

``int4_expert_gemv`` computes, for each of a token's ``top_k`` experts, ``y[j] = W_e @ x[j]``
straight from the packed int4 bytes and group scales, and zero points where the experts have
them (the layout of ``quant.py``). A device
table gives each expert's cache slot; an expert with no slot (-1) is read from the host store in
pinned memory, which the GPU addresses directly (unified virtual addressing), so a miss costs its
bytes over PCIe once and no copy, no host sync and no Python. That keeps the whole decode step a
fixed sequence of kernels a CUDA graph can replay.

``int4_dequantize_rows`` turns the experts a prefill chunk needs into dense weights in one pass,
for the grouped matrix products of ``engine.py``.

Importing this module imports triton; the engine imports it only when it runs the GPU path. The
tests run the same kernels on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemv(x_ptr, x_stride, ids_ptr, table_ptr,
               cache_q, cache_s, host_q, host_s, y_ptr, use_ptr, cache_z, host_z,
               OUT: tl.constexpr, IN: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr,
               GPI: tl.constexpr, USE: tl.constexpr, ZERO: tl.constexpr):
    j = tl.program_id(0)                 # which of the token's experts
    nb = tl.program_id(1)                # which block of output rows
    e = tl.load(ids_ptr + j).to(tl.int64)
    slot = tl.load(table_ptr + e).to(tl.int64)
    HALF: tl.constexpr = G // 2          # packed bytes per group and row
    NG: tl.constexpr = IN // G
    W: tl.constexpr = GPI * HALF         # packed bytes per row and step: GPI groups, at least 128 B
    rows = nb * BN + tl.arange(0, BN)    # so that a miss reads whole 128-byte lines over PCIe
    cols = tl.arange(0, W)
    in_rows = rows < OUT
    # per-row masks, compared as vectors: Triton 3.9's interpreter turns a scalar bool & a
    # vector bool into int32, which tl.load refuses as a mask
    slots = tl.zeros([BN], dtype=tl.int64) + slot
    live = in_rows
    if USE:     # hybrid decode: an expert the CPU computes reads nothing here and gives 0
        live = in_rows & ((tl.zeros([BN], dtype=tl.int32) + tl.load(use_ptr + j)) != 0)
    on_device = (live & (slots >= 0))[:, None]
    on_host = (live & (slots < 0))[:, None]
    # both bases are computed; the masks make sure only one is ever read
    qc = cache_q + slot * (OUT * (IN // 2))
    qh = host_q + e * (OUT * (IN // 2))
    sc = cache_s + slot * (OUT * NG)
    sh = host_s + e * (OUT * NG)
    xrow = x_ptr + j * x_stride
    gsel = tl.arange(0, GPI)
    acc = tl.zeros([BN], dtype=tl.float32)
    for step in range(NG // GPI):
        off = rows[:, None] * (IN // 2) + step * W + cols[None, :]
        p = tl.load(qc + off, mask=on_device, other=0) | tl.load(qh + off, mask=on_host, other=0)
        lo = (p & 15).to(tl.float32) - 8.0
        hi = (p >> 4).to(tl.float32) - 8.0
        xe = tl.load(xrow + step * 2 * W + 2 * cols).to(tl.float32)
        xo = tl.load(xrow + step * 2 * W + 2 * cols + 1).to(tl.float32)
        if ACT:   # x is [gate | up] of the layer before: silu(gate) * up, on the fly
            ue = tl.load(xrow + IN + step * 2 * W + 2 * cols).to(tl.float32)
            uo = tl.load(xrow + IN + step * 2 * W + 2 * cols + 1).to(tl.float32)
            xe = xe * tl.sigmoid(xe) * ue
            xo = xo * tl.sigmoid(xo) * uo
        part = tl.sum(tl.reshape(lo * xe[None, :] + hi * xo[None, :], (BN, GPI, HALF)), axis=2)   # [BN, GPI]
        soff = rows[:, None] * NG + step * GPI + gsel[None, :]
        if ZERO:  # (nibble - z) = (nibble - 8) + (8 - z): add (8 - z) * the group's sum of x
            xs = tl.sum(tl.reshape(xe + xo, (GPI, HALF)), axis=1)                              # [GPI]
            z = (tl.load(cache_z + slot * (OUT * NG) + soff, mask=on_device, other=0).to(tl.float32)
                 + tl.load(host_z + e * (OUT * NG) + soff, mask=on_host, other=0).to(tl.float32))
            part += (8.0 - z) * xs[None, :]
        s = (tl.load(sc + soff, mask=on_device, other=0.0).to(tl.float32)
             + tl.load(sh + soff, mask=on_host, other=0.0).to(tl.float32))
        acc += tl.sum(part * s, axis=1)
    tl.store(y_ptr + j * OUT + rows, acc, mask=in_rows)


def int4_expert_gemv(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                     cache_q: torch.Tensor, cache_s: torch.Tensor, host_q: torch.Tensor, host_s: torch.Tensor,
                     block_rows: int = 16, act: bool = False, use: torch.Tensor | None = None,
                     cache_z: torch.Tensor | None = None, host_z: torch.Tensor | None = None) -> torch.Tensor:
    """``y [top_k, R]`` (float32) = expert ``ids[j]``'s int4 matrix [R, C] times ``x[j]`` (or ``x``
    for all when it is 1-D). ``table[e]`` is e's row in ``cache_q/cache_s`` or -1 for the host
    store ``host_q/host_s`` ([E, R, C/2] uint8 and [E, R, C/group] bf16). With ``act``, ``x[j]``
    is [2C] (gate, up) and the input is ``silu(gate) * up``. With ``use`` (int32 [top_k]), an
    expert whose entry is 0 is left out (its row of ``y`` is 0): the CPU computes it. With zero
    points, ``cache_z/host_z`` (uint8, shaped as the scales) give each group's zero instead of 8;
    without them the kernel is compiled without that code."""
    k = ids.shape[0]
    r, half = host_q.shape[1:]
    c = 2 * half
    group = c // host_s.shape[2]
    y = torch.empty(k, r, dtype=torch.float32, device=x.device)
    x_stride = 0 if x.dim() == 1 else x.stride(0)
    groups = c // group
    gpi = 1
    while gpi * group // 2 < 128 and groups % (2 * gpi) == 0:
        gpi *= 2
    grid = (k, triton.cdiv(r, block_rows))
    zero = host_z is not None
    _int4_gemv[grid](x, x_stride, ids, table, cache_q, cache_s, host_q, host_s, y, use if use is not None else ids,
                     (cache_z if cache_z is not None else cache_q) if zero else cache_q, host_z if zero else host_q,
                     OUT=r, IN=c, G=group, BN=block_rows, ACT=act, GPI=gpi, USE=use is not None, ZERO=zero)
    return y



@triton.jit
def _int4_dequant(q_ptr, s_ptr, rows_ptr, out_ptr, z_ptr, R, HALF: tl.constexpr, G: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr, ZERO: tl.constexpr):
    j = tl.program_id(0)                 # which of the requested experts
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    b = tl.program_id(2) * BC + tl.arange(0, BC)      # packed byte columns
    e = tl.load(rows_ptr + j).to(tl.int64)
    m = (r < R)[:, None] & (b < HALF)[None, :]
    p = tl.load(q_ptr + e * R * HALF + r[:, None] * HALF + b[None, :], mask=m, other=0)
    soff = e * R * (2 * HALF // G) + r[:, None] * (2 * HALF // G) + (2 * b[None, :]) // G
    s = tl.load(s_ptr + soff, mask=m, other=0.0).to(tl.float32)    # an even column and the odd one after it share a group
    if ZERO:
        z = tl.load(z_ptr + soff, mask=m, other=0).to(tl.float32)
    else:
        z = 8.0
    lo = ((p & 15).to(tl.float32) - z) * s
    hi = ((p >> 4).to(tl.float32) - z) * s
    w = tl.interleave(lo, hi).to(out_ptr.dtype.element_ty)              # [BR, 2 * BC]
    c = 2 * tl.program_id(2) * BC + tl.arange(0, 2 * BC)
    mo = (r < R)[:, None] & (c < 2 * HALF)[None, :]
    tl.store(out_ptr + j * R * (2 * HALF) + r[:, None] * (2 * HALF) + c[None, :], w, mask=mo)


def int4_dequantize_rows(q: torch.Tensor, s: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                         block_rows: int = 16, block_bytes: int = 128, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``[len(rows), R, C]`` in ``dtype`` of experts ``rows`` of ``q/s`` ([E, R, C/2] uint8,
    [E, R, C/group] bf16; on the GPU or, read in place, in pinned host memory): one pass that
    reads the packed bytes and writes the weights, where ``quant.dequantize`` makes six passes.
    The same numbers: each weight is (nibble - 8) * scale (or (nibble - zero) * scale with
    ``zero``, uint8 shaped as ``s``), exact in float32 and rounded once to
    ``dtype`` (to nearest on the GPU; Triton's interpreter truncates)."""
    n = rows.shape[0]
    r, half = q.shape[1:]
    out = torch.empty(n, r, 2 * half, dtype=dtype, device=rows.device)
    if n:
        group = 2 * half // s.shape[2]
        grid = (n, triton.cdiv(r, block_rows), triton.cdiv(half, block_bytes))
        _int4_dequant[grid](q, s, rows, out, zero if zero is not None else q, r, HALF=half, G=group, BR=block_rows,
                            BC=block_bytes, ZERO=zero is not None)
    return out

# ---- the resident part of a decode step, fused ------------------------------------------------
# At batch 1 every op of the decode step is a kernel launch of a few microseconds, and transformers'
# formulation of a Qwen3-Next layer is about a hundred of them. These kernels do the same arithmetic
# (float32 inside, one rounding at the end) in a few launches per layer. Each has the plain-torch
# formulation beside it in decode.py, which the tests compare it with.

@triton.jit
def _add_rms_norm(h_ptr, x_ptr, w_ptr, out_ptr, stride, N: tl.constexpr, eps,
                  HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < N
    h = tl.load(h_ptr + row * stride + c, mask=m, other=0.0)
    if HAS_X:   # the residual stream takes the sublayer's output first, in place
        h = (h.to(tl.float32) + tl.load(x_ptr + row * stride + c, mask=m, other=0.0).to(tl.float32))
        h = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride + c, h, mask=m)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / N
    y = hf * tl.rsqrt(var + eps) * (1.0 + tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32))
    tl.store(out_ptr + row * N + c, y.to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(h: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> torch.Tensor:
    """Zero-centred RMSNorm of ``h`` (rows of ``weight.numel()``, rows ``h.stride(0)`` apart) into
    ``out``; with ``x``, first ``h += x`` in place (the residual add)."""
    n = weight.numel()
    rows = h.numel() // n if h.dim() == 1 else h.shape[0]
    stride = n if h.dim() == 1 else h.stride(0)
    _add_rms_norm[(rows,)](h, x if x is not None else h, weight, out, stride, N=n, eps=eps,
                           HAS_X=x is not None, BLOCK=triton.next_power_of_2(n))
    return out


@triton.jit
def _conv_step(qkvz_ptr, state_ptr, w_ptr, out_ptr, C, NK: tl.constexpr, DK: tl.constexpr,
               VR: tl.constexpr, KS: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    GROUP: tl.constexpr = 2 * DK + 2 * VR
    KEY: tl.constexpr = NK * DK
    ck = c - KEY
    cv = c - 2 * KEY
    # channel c of cat(q, k, v) as it lies in in_proj_qkvz's output, grouped per key head
    src = tl.where(c < KEY, (c // DK) * GROUP + c % DK,
                   tl.where(c < 2 * KEY, (ck // DK) * GROUP + DK + ck % DK, (cv // VR) * GROUP + 2 * DK + cv % VR))
    x = tl.load(qkvz_ptr + src, mask=m, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(KS):
        if j < KS - 1:
            s = tl.load(state_ptr + c * KS + j + 1, mask=m, other=0.0)
        else:
            s = x.to(state_ptr.dtype.element_ty)
        tl.store(state_ptr + c * KS + j, s, mask=m)
        acc += s.to(tl.float32) * tl.load(w_ptr + c * KS + j, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + c, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gdn_step(conv_ptr, qkvz_ptr, ba_ptr, alog_ptr, dtb_ptr, state_ptr, normw_ptr, out_ptr, eps,
              NK: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    h = tl.program_id(0)          # value head
    kh = h // R                   # its key head
    j = h % R
    kd = tl.arange(0, DK)
    vd = tl.arange(0, DV)
    KEY: tl.constexpr = NK * DK
    GROUP: tl.constexpr = 2 * DK + 2 * R * DV
    q = tl.load(conv_ptr + kh * DK + kd).to(tl.float32)
    k = tl.load(conv_ptr + KEY + kh * DK + kd).to(tl.float32)
    v = tl.load(conv_ptr + 2 * KEY + h * DV + vd).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * (1.0 / tl.sqrt(DK * 1.0))
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    b = tl.load(ba_ptr + kh * 2 * R + j).to(tl.float32)
    a = tl.load(ba_ptr + kh * 2 * R + R + j).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    beta = tl.sigmoid(b)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus
    sp = state_ptr + h * DK * DV + kd[:, None] * DV + vd[None, :]
    S = tl.load(sp) * tl.exp(g)
    kv = tl.sum(S * k[:, None], axis=0)
    delta = (v - kv) * beta
    S = S + k[:, None] * delta[None, :]
    tl.store(sp, S)
    o = tl.sum(S * q[:, None], axis=0)
    # gated RMSNorm: norm(o) * w * silu(z)
    o = o * tl.rsqrt(tl.sum(o * o, axis=0) / DV + eps) * tl.load(normw_ptr + vd).to(tl.float32)
    z = tl.load(qkvz_ptr + kh * GROUP + 2 * DK + R * DV + j * DV + vd).to(tl.float32)
    tl.store(out_ptr + h * DV + vd, (o * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty))


def gated_delta_step(qkvz: torch.Tensor, ba: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor,
                     a_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor, norm_w: torch.Tensor,
                     eps: float, nk: int, dk: int, dv: int, conv_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One Gated DeltaNet token after the input projections: causal conv (state shifted in place),
    then per value head the gated delta rule on ``state`` [nv, dk, dv] and the gated RMSNorm.
    Writes ``out`` [nv * dv], the input of out_proj."""
    nv = state.shape[0]
    c = conv_state.shape[0]
    block = 256
    _conv_step[(triton.cdiv(c, block),)](qkvz, conv_state, conv_w, conv_out, c, NK=nk, DK=dk, VR=(nv // nk) * dv,
                                         KS=conv_state.shape[1], BLOCK=block)
    _gdn_step[(nv,)](conv_out, qkvz, ba, a_log, dt_bias, state, norm_w, out, eps, NK=nk, R=nv // nk, DK=dk, DV=dv,
                     num_warps=8)
    return out


@triton.jit
def _router(logits_ptr, noise_ptr, ids_ptr, w_ptr, rec_ptr, E: tl.constexpr, K: tl.constexpr,
            NORM: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr):
    e = tl.arange(0, BLOCK)
    m = e < E
    lg = tl.load(logits_ptr + e, mask=m, other=float("-inf")).to(tl.float32)
    p = tl.exp(lg - tl.max(lg, axis=0))
    p = p / tl.sum(p, axis=0)
    if NOISE:   # benchmarks: pick experts by the noise instead of the router
        sel = tl.load(noise_ptr + e, mask=m, other=0.0).to(tl.float32)
    else:
        sel = p
    # One int64 key per expert: the score's float32 bits (ordered as the scores are, for scores
    # >= 0) above BLOCK - 1 - e. So one max gives the best score and, among equal scores, the
    # smallest index; -1 is below every key (lanes past E, experts already picked).
    key = (sel.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK - 1 - e).to(tl.int64)
    key = tl.where(m, key, -1)
    slot = tl.arange(0, KB)
    ids = tl.zeros([KB], dtype=tl.int64)
    ws = tl.zeros([KB], dtype=tl.float32)
    for i in tl.static_range(K):
        best = tl.max(key, axis=0)
        idx = BLOCK - 1 - (best & (BLOCK - 1))
        if NOISE:
            wi = tl.sum(tl.where(e == idx, p, 0.0), axis=0)
        else:       # the score is the probability: its bits are in the key
            wi = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        ids = tl.where(slot == i, idx, ids)
        ws = tl.where(slot == i, wi, ws)
        key = tl.where(key == best, -1, key)
    if NORM:
        ws = ws / tl.sum(ws, axis=0)
    km = slot < K
    tl.store(ids_ptr + slot, ids, mask=km)
    tl.store(rec_ptr + slot, ids, mask=km)
    tl.store(w_ptr + slot, ws.to(w_ptr.dtype.element_ty), mask=km)


def route(logits: torch.Tensor, top_k: int, norm: bool, ids: torch.Tensor, weights: torch.Tensor,
          record: torch.Tensor, noise: torch.Tensor | None = None) -> None:
    """Softmax over the router logits, the top_k experts (by ``noise`` instead, when given; it
    must be >= 0, as torch.rand's) and their weights, renormalised when ``norm``; the ids go to
    ``ids`` and ``record``. Among equal scores the smaller expert index is picked first."""
    e = logits.numel()
    # One warp: the kernel is a chain of K + 2 reductions over E = 512 values, 16 a thread at one
    # warp. Each is shuffles within the warp; with more warps each also goes through shared
    # memory and a barrier, which costs more than the few extra values a thread reads.
    _router[(1,)](logits, noise if noise is not None else logits, ids, weights, record, E=e, K=top_k,
                  NORM=norm, NOISE=noise is not None, BLOCK=triton.next_power_of_2(e),
                  KB=triton.next_power_of_2(top_k), num_warps=1)


@triton.jit
def _combine(h_ptr, y_ptr, w_ptr, shared_ptr, sg_ptr, cpu_ptr, down_ptr, down_stride, N: tl.constexpr,
             K: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, HAS_CPU: tl.constexpr, I: tl.constexpr,
             BI: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    dt = h_ptr.dtype.element_ty
    kk = tl.arange(0, KB)
    km = kk < K
    y = tl.load(y_ptr + kk[:, None] * N + c[None, :], mask=km[:, None] & m[None, :], other=0.0)
    w = tl.load(w_ptr + kk, mask=km, other=0.0).to(tl.float32)
    routed = tl.sum(y * w[:, None], axis=0)
    if HAS_CPU:   # the weighted sum of the experts the CPU computed (hybrid decode)
        routed += tl.load(cpu_ptr + c, mask=m, other=0.0)
    routed = routed.to(dt).to(tl.float32)
    gate = tl.sigmoid(tl.load(sg_ptr).to(tl.float32))
    if I > 0:   # shared_ptr holds the shared expert's [gate | up] [2I]: its down projection here
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, I, BI):
            i = i0 + tl.arange(0, BI)
            im = i < I
            g = tl.load(shared_ptr + i, mask=im, other=0.0).to(tl.float32)
            u = tl.load(shared_ptr + I + i, mask=im, other=0.0).to(tl.float32)
            act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)        # torch rounds silu's output
            act = (act * u).to(dt).to(tl.float32)
            wd = tl.load(down_ptr + c[:, None] * down_stride + i[None, :], mask=m[:, None] & im[None, :], other=0.0)
            acc += tl.sum(wd.to(tl.float32) * act[None, :], axis=1)
        shared = acc.to(dt).to(tl.float32)                         # F.linear's output, rounded
    else:
        shared = tl.load(shared_ptr + c, mask=m, other=0.0).to(tl.float32)
    shared = (gate.to(dt).to(tl.float32) * shared).to(dt).to(tl.float32)
    h = tl.load(h_ptr + c, mask=m, other=0.0).to(tl.float32)
    moe = (routed + shared).to(dt).to(tl.float32)
    tl.store(h_ptr + c, (h + moe).to(dt), mask=m)


def combine(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, shared: torch.Tensor, shared_gate: torch.Tensor,
            cpu: torch.Tensor | None = None, down: torch.Tensor | None = None, block_cols: int = 16,
            block_inner: int = 512) -> None:
    """``h += sum_j w[j] y[j] (+ cpu) + sigmoid(shared_gate) * shared`` in place (the MoE block's
    output added to the residual stream, rounded where transformers rounds); ``cpu`` [N] float32
    is the weighted sum of the experts the CPU computed.

    With ``down`` [N, I] (the shared expert's down projection), ``shared`` is the shared expert's
    gate and up projections [2I] instead of its output, and the kernel computes that output,
    ``down @ (silu(gate) * up)`` in float32 rounded as F.linear's, in programs of ``block_cols``
    outputs reading ``block_inner`` columns of ``down`` at a time: at N = 2048, 128 programs
    share the 2 MB of ``down``, in place of an activation kernel and a latency-bound GEMV."""
    n = h.numel()
    fused = down is not None
    block = block_cols if fused else 512
    inter = down.shape[1] if fused else 0
    _combine[(triton.cdiv(n, block),)](h, y, w, shared, shared_gate, cpu if cpu is not None else y,
                                       down if fused else y, down.stride(0) if fused else 0, N=n,
                                       K=y.shape[0], BLOCK=block, KB=triton.next_power_of_2(y.shape[0]),
                                       HAS_CPU=cpu is not None, I=inter,
                                       BI=min(triton.next_power_of_2(max(inter, 1)), block_inner))


# ---- attention decode: q/k norms, RoPE and the KV write in one kernel, then attention over the
# cache split across positions (flash-decoding) and the splits' reduction with the output gate.

@triton.jit
def _attn_prep(qkv_ptr, qnw_ptr, knw_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, keys_ptr, values_ptr, kv_stride,
               eps, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, ROT: tl.constexpr):
    i = tl.program_id(0)              # query heads first, then key/value heads
    is_q = i < NH
    kv = i - NH
    d = tl.arange(0, HD)
    HALF: tl.constexpr = ROT // 2
    rot = d < ROT
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    sign = tl.where(d < HALF, -1.0, 1.0)
    # q of head i lies in the first NH * 2 * HD outputs (each head's q, then its gate); k after
    base = tl.where(is_q, i * 2 * HD, NH * 2 * HD + kv * HD)
    x = tl.load(qkv_ptr + base + d).to(tl.float32)
    xp = tl.load(qkv_ptr + base + partner, mask=rot, other=0.0).to(tl.float32)
    w = tl.where(is_q, tl.load(qnw_ptr + d), tl.load(knw_ptr + d)).to(tl.float32)
    wp = tl.where(is_q, tl.load(qnw_ptr + partner, mask=rot, other=0.0),
                  tl.load(knw_ptr + partner, mask=rot, other=0.0)).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / HD + eps)
    # the normed head, rounded as transformers' RMSNorm returns it, then rotated
    xn = (x * r * (1.0 + w)).to(q_ptr.dtype.element_ty).to(tl.float32)
    xpn = (xp * r * (1.0 + wp)).to(q_ptr.dtype.element_ty).to(tl.float32)
    c = tl.load(cos_ptr + d, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + d, mask=rot, other=0.0).to(tl.float32)
    y = tl.where(rot, xn * c + sign * xpn * s, xn).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + i * HD + d, y, mask=d < tl.where(is_q, HD, 0))
    pos = tl.load(pos_ptr)
    is_kv = d < tl.where(is_q, 0, HD)
    tl.store(keys_ptr + kv * kv_stride + pos * HD + d, y, mask=is_kv)
    v = tl.load(qkv_ptr + NH * 2 * HD + NKV * HD + kv * HD + d, mask=is_kv, other=0.0)
    tl.store(values_ptr + kv * kv_stride + pos * HD + d, v, mask=is_kv)


@triton.jit
def _attn_split(q_ptr, keys_ptr, values_ptr, pos_ptr, part_ptr, kv_stride, scale,
                G: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    kvh = h // G
    n = tl.load(pos_ptr) + 1          # positions 0 .. pos, this token's included
    per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK) * BLOCK
    start = sp * per
    end = tl.minimum(start + per, n)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + h * HD + d).to(tl.float32) * scale
    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    acc = tl.zeros([HD], tl.float32)
    for b in range(start, end, BLOCK):
        p_ = b + tl.arange(0, BLOCK)
        pm = p_ < end
        off = kvh * kv_stride + p_[:, None] * HD + d[None, :]
        k = tl.load(keys_ptr + off, mask=pm[:, None], other=0.0).to(tl.float32)
        sc = tl.where(pm, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        v = tl.load(values_ptr + off, mask=pm[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    row = part_ptr + (h * SPLITS + sp) * (HD + 2)
    tl.store(row + d, acc)
    tl.store(row + HD, m_i)
    tl.store(row + HD + 1, l_i)


@triton.jit
def _attn_reduce(part_ptr, qkv_ptr, out_ptr, HD: tl.constexpr, SPLITS: tl.constexpr):
    h = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HD)
    rows = part_ptr + (h * SPLITS + s) * (HD + 2)
    m = tl.load(rows + HD)
    w = tl.exp(m - tl.max(m, axis=0))          # a split with no positions has m = -inf: weight 0
    total = tl.sum(tl.load(rows + HD + 1) * w, axis=0)
    o = tl.sum(tl.load(rows[:, None] + d[None, :]) * w[:, None], axis=0) / total
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)
    gate = tl.load(qkv_ptr + h * 2 * HD + HD + d).to(tl.float32)
    sg = tl.sigmoid(gate).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + h * HD + d, (o * sg).to(out_ptr.dtype.element_ty))


ATTN_SPLITS = 16     # programs per head over the cached positions
ATTN_BLOCK = 32      # positions a program reads at a time


def attention_decode(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     eps: float, scale: float, q: torch.Tensor, part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One token of Qwen3-Next's gated attention after its stacked q/k/v projection ``qkv``
    (per head q then gate, then k, then v): zero-centred RMSNorm of q and k heads, RoPE on their
    first ``len(cos)`` dims, k and v written at ``pos`` into ``keys``/``values`` [kv heads,
    context, head dim], attention over positions 0..pos, times sigmoid(gate). Writes ``out``
    [heads * head dim], the input of o_proj; ``q`` [heads * head dim] and ``part`` [heads,
    ATTN_SPLITS, head dim + 2] float32 are scratch."""
    nkv, ctx, hd = keys.shape
    nh = q.numel() // hd
    _attn_prep[(nh + nkv,)](qkv, q_norm, k_norm, cos, sin, pos, q, keys, values, ctx * hd, eps,
                            NH=nh, NKV=nkv, HD=hd, ROT=cos.numel())
    _attn_split[(nh, ATTN_SPLITS)](q, keys, values, pos, part, ctx * hd, scale, G=nh // nkv, HD=hd,
                                   SPLITS=ATTN_SPLITS, BLOCK=ATTN_BLOCK)
    _attn_reduce[(nh,)](part, qkv, out, HD=hd, SPLITS=ATTN_SPLITS)
    return out


# ---- hybrid decode: the GPU hands some missed experts to the CPU and waits for their sum -------
# Flags and mailboxes live in pinned host memory that both sides address. ``publish`` writes the
# token's normed hidden state and the CPU's experts there, then the layer's ``ready`` flag (the
# token's number) after a system-wide fence; the CPU thread (cpu_experts.c) computes and raises
# ``done``; ``wait_cpu`` spins on it (bounded) and copies the CPU's sum into device memory.

@triton.jit
def _globaltimer(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _publish(x_ptr, ids_ptr, w_ptr, table_ptr, share_ptr, seq_ptr, use_ptr, ncpu_ptr,
             bx_ptr, bids_ptr, bw_ptr, bn_ptr, ready_ptr, t_ptr, moe,
             H: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, BH: tl.constexpr, GPU: tl.constexpr,
             MIN_MISSES: tl.constexpr):
    kk = tl.arange(0, KB)
    km = kk < K
    ids = tl.load(ids_ptr + kk, mask=km, other=0)
    slot = tl.load(table_ptr + ids, mask=km, other=0)
    miss = (km & (slot < 0)).to(tl.int32)
    m = tl.sum(miss, axis=0)
    c = tl.minimum((m.to(tl.float32) * tl.load(share_ptr + moe) + 0.5).to(tl.int32), m)
    c = tl.where(m >= MIN_MISSES, c, 0)          # a miss or two: the GPU alone is quicker
    rank = tl.cumsum(miss, axis=0) - 1           # the first c misses go to the CPU
    cpu = (miss != 0) & (rank < c)
    tl.store(use_ptr + kk, tl.where(cpu, 0, 1), mask=km)
    w = tl.load(w_ptr + kk, mask=km, other=0.0).to(tl.float32)
    tl.store(bids_ptr + moe * K + rank, ids.to(tl.int32), mask=cpu)
    tl.store(bw_ptr + moe * K + rank, w, mask=cpu)
    tl.store(bn_ptr + moe, c)
    tl.store(ncpu_ptr + moe, c)
    h = tl.arange(0, BH)
    hm = h < H
    tl.store(bx_ptr + moe * H + h, tl.load(x_ptr + h, mask=hm, other=0.0).to(tl.float32), mask=hm)
    seq = tl.load(seq_ptr)
    if GPU:
        tl.debug_barrier()          # every thread's stores, then a fence to the system, then the flag
        fence = tl.inline_asm_elementwise("fence.sc.sys;\n mov.u32 $0, 0;", "=r,r", [seq], dtype=tl.int32,
                                          is_pure=False, pack=1)
        seq = seq + fence
        tl.store(t_ptr + moe * 3, _globaltimer(seq))
    tl.store(ready_ptr + moe, seq)


@triton.jit
def _wait_cpu(ncpu_ptr, seq_ptr, done_ptr, by_ptr, out_ptr, err_ptr, t_ptr, moe,
              H: tl.constexpr, BH: tl.constexpr, MAX_SPIN: tl.constexpr):
    h = tl.arange(0, BH)
    hm = h < H
    n = tl.load(ncpu_ptr + moe)
    seq = tl.load(seq_ptr)
    tl.store(t_ptr + moe * 3 + 1, _globaltimer(seq))
    y = tl.zeros([BH], dtype=tl.float32)
    if n > 0:
        flag = tl.load(done_ptr + moe, volatile=True)
        spins = 0
        while (flag != seq) & (spins < MAX_SPIN):
            flag = tl.load(done_ptr + moe, volatile=True)
            spins += 1
        if flag == seq:
            y = tl.load(by_ptr + moe * H + h, mask=hm, other=0.0, cache_modifier=".cv")
        else:
            tl.store(err_ptr, 1)
    tl.store(out_ptr + h, y, mask=hm)
    tl.store(t_ptr + moe * 3 + 2, _globaltimer(seq))


def publish(x, ids, w, table, share, seq, use, ncpu, box, moe: int, min_misses: int = 1) -> None:
    """Split layer ``moe``'s misses: the first ``round(share[moe] * misses)`` go to the CPU (``use``
    0 for them; none when the layer has fewer than ``min_misses``), the rest stay with the GPU;
    hand the CPU its experts, weights and ``x``. ``box`` holds the pinned mailboxes (x, ids, w, n,
    ready, gpu_times)."""
    h, k = x.numel(), ids.numel()
    _publish[(1,)](x, ids, w, table, share, seq, use, ncpu, box.x, box.ids, box.w, box.n, box.ready,
                   box.gpu_times, moe, H=h, K=k, KB=triton.next_power_of_2(k), BH=triton.next_power_of_2(h),
                   GPU=x.is_cuda, MIN_MISSES=min_misses, num_warps=4)


def wait_cpu(ncpu, seq, box, out, moe: int, max_spin: int = 1 << 20) -> None:
    """Wait until the CPU has served layer ``moe`` of this token (when it has any expert there),
    then copy its sum into ``out``; after ``max_spin`` reads of the flag, give up and set
    ``box.error``."""
    h = out.numel()
    _wait_cpu[(1,)](ncpu, seq, box.done, box.y, out, box.error, box.gpu_times, moe, H=h,
                    BH=triton.next_power_of_2(h), MAX_SPIN=max_spin, num_warps=4)
