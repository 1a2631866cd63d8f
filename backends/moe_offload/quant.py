"""Storage formats of routed experts and their one reference dequantization.

Formats (per projection of a layer, all experts stacked on dim 0):

* ``none``: ``data`` [E, R, C] in the compute dtype.
* ``int4``: group-wise int4 along the input dim. ``data`` uint8 [E, R, C/2] (low nibble = even
  column, high nibble = odd column); ``scale`` [E, R, C/group], bf16 (or fp16, where a GPTQ
  checkpoint's scales are kept as they are). Symmetric (our conversion, symmetric checkpoints):
  W = (nibble - 8) * scale. Asymmetric checkpoints add ``zero`` uint8 [E, R, C/group] (one integer
  zero point per group, 0..16): W = (nibble - zero) * scale. Without ``zero`` it is 8.
* ``fp8``: ``data`` float8_e4m3fn [E, R, C]; ``scale`` float32 [E, ceil(R/br), ceil(C/bc)] for a block
  (br, bc) that covers per-tensor, per-channel and 128x128 block scales alike. W = data * scale.

``dequantize`` is the one function both the engine and the tests use to turn stored experts back
into dense weights, so "the same dequantized weights" means exactly the same numbers.

Our own int4 conversion (``int4_quantize``) searches each group's scale for the least squared
error (``INT4_QUANTIZER``); round-to-nearest from the group's largest magnitude is kept as
``int4_quantize_rtn`` for comparison (bench/quant_error.py measures both).
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0


# The quantizer of our own int4 conversion, part of the converted-experts cache key: experts
# converted by another quantizer (or another version of this one) are converted anew.
INT4_QUANTIZER = "mse-search-v1"
INT4_SCALE_DTYPES = (torch.bfloat16, torch.float16)
# candidate scales of the search: the group's largest magnitude maps to -(8 + step / 10)
SEARCH_STEPS = (-8, 0, 8)


def _pack(q: torch.Tensor, shape) -> torch.Tensor:
    """Integers in [0, 15] [..., R, C/group, group] -> packed uint8 [..., R, C/2]."""
    *lead, r, c = shape
    q = q.reshape(*lead, r, c).to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    *lead, r, c = w.shape
    if c % group or c % 2:
        raise ValueError(f"int4 group size {group} does not divide the input width {c}")
    return w.float().reshape(*lead, r, c // group, group)


def int4_quantize_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest with scale = the group's largest magnitude / 7 (the first quantizer).
    [..., R, C] float -> (packed uint8 [..., R, C/2], scale bf16 [..., R, C/group])."""
    wg = _groups(w, group)
    scale = (wg.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(wg / scale.float()).clamp_(-8, 7) + 8
    return _pack(q, w.shape), scale.squeeze(-1).contiguous()


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 with each group's scale chosen for the least squared error, in the same
    format as ``int4_quantize_rtn`` (so decode reads the same bytes at the same speed).

    As llama.cpp's ``make_qx_quants``: the group's signed largest value is mapped to -(8 + t/10)
    for t in ``SEARCH_STEPS`` (using the level -8 that a /7 scale leaves idle, and clipping the
    outlier or leaving it room); for each candidate rounding the least-squares scale
    sum(w q) / sum(q q) is computed, the candidate with the least error wins, and one more round
    (round to that scale, least-squares scale again) refines it. The winner's scale (negative
    where the peak is positive) is rounded to bf16 and the group rounded once more to it.
    Vectorized over the whole tensor (bench/quant_error.py measures the cost per GB).
    [..., R, C] float -> (packed uint8 [..., R, C/2], scale bf16 [..., R, C/group])."""
    wg = _groups(w, group)
    peak = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))      # the signed largest value
    peak = torch.where(peak == 0, torch.ones_like(peak), peak)
    w2 = torch.linalg.vecdot(wg, wg)
    q = torch.empty_like(wg)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(least-squares scale, squared error) of the rounding q = round(w * iscale)."""
        torch.mul(wg, iscale, out=q)
        q.round_().clamp_(-8, 7)
        wq = torch.linalg.vecdot(wg, q)
        s = wq / torch.linalg.vecdot(q, q).clamp_min(1e-30)
        return s, w2 - wq * s

    best_s = best_err = None
    for t in SEARCH_STEPS:
        s, err = fit(-(8.0 + t / 10.0) / peak)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    safe = torch.where(best_s.abs() < 1e-8, torch.full_like(best_s, 1e-8), best_s)
    s, err = fit((1.0 / safe).unsqueeze(-1))
    best_s = torch.where(err < best_err, s, best_s)
    scale = torch.where(best_s.abs() < 1e-8, torch.full_like(best_s, 1e-8), best_s).to(torch.bfloat16)
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp_(-8, 7) + 8
    return _pack(q, w.shape), scale.contiguous()


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    zero: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [..., R, C]: (nibble - 8) * scale, or (nibble - zero) * scale with zero points."""
    *lead, r, half = packed.shape
    groups = scale.shape[-1]
    lo = (packed & 0x0F)
    hi = (packed >> 4)
    q = torch.stack((lo, hi), dim=-1).reshape(*lead, r, groups, (2 * half) // groups)
    offset = 8 if zero is None else zero.to(dtype).unsqueeze(-1)
    w = (q.to(dtype) - offset) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(*lead, r, 2 * half)


def fp8_block_of(weight_shape: tuple[int, int], scale_shape: tuple[int, ...],
                 hint: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (rows, cols) block a scale grid stands for: tensor, channel or block scales.

    ``hint`` is the checkpoint's declared block (e.g. ``weight_block_size``); it wins where the
    grid matches it, since a partial last block makes the grid alone ambiguous."""
    r, c = weight_shape
    if len(scale_shape) == 0 or math.prod(scale_shape) == 1:
        return r, c
    if len(scale_shape) == 1:  # per output channel, flattened
        return 1, c
    sr, sc = scale_shape[-2], scale_shape[-1]
    if hint and (sr, sc) == (math.ceil(r / hint[0]), math.ceil(c / hint[1])):
        return (hint[0] if sr > 1 else r), (hint[1] if sc > 1 else c)
    return math.ceil(r / sr), math.ceil(c / sc)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (float8_e4m3fn [R, C], float32 scale [ceil(R/br), ceil(C/bc)])."""
    r, c = w.shape
    br, bc = block
    nr, nc = math.ceil(r / br), math.ceil(c / bc)
    pad = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=w.device)
    pad[:r, :c] = w.float()
    blocks = pad.reshape(nr, br, nc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).reshape(nr * br, nc * bc)[:r, :c]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def expand_scale(scale: torch.Tensor, block: tuple[int, int], r: int, c: int) -> torch.Tensor:
    br, bc = block
    s = scale
    if s.dim() < 2:
        s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)
    return s.repeat_interleave(br, dim=-2)[..., :r, :].repeat_interleave(bc, dim=-1)[..., :c]


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """Dense [..., R, C] = data * the scale of its block, in float32 then ``dtype``; a leading
    batch dim on ``data`` goes with one on ``scale``. Where the blocks tile the matrix the scale
    is broadcast over a blocked view (no expanded copy of it): the same products either way."""
    r, c = data.shape[-2:]
    br, bc = block
    s = scale.float()
    w = fp8_to_float32(data)
    if r % br == 0 and c % bc == 0 and s.dim() >= 2 and tuple(s.shape[-2:]) == (r // br, c // bc):
        lead = data.shape[:-2]
        blocks = w.reshape(*lead, r // br, br, c // bc, bc)
        return (blocks * s.unsqueeze(-1).unsqueeze(-3)).reshape(*lead, r, c).to(dtype)
    return (w * expand_scale(s, block, r, c)).to(dtype)


def fp8_to_float32(data: torch.Tensor) -> torch.Tensor:
    """``data.to(torch.float32)``. torch's float8 cast is slow on the CPU (about 2 ms a [512, 2048]
    expert matrix on 2 cores, as long as quantizing it); a lookup in a table of the same cast of
    all 256 codes gives the same values about 3 times faster (bench/convert_speed.py)."""
    if data.dtype != torch.float8_e4m3fn or data.device.type != "cpu":
        return data.to(torch.float32)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return torch.take(table, data.view(torch.uint8).long())


def dequantize(fmt: str, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
               block: tuple[int, int] | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weights [..., R, C] in ``dtype`` from stored experts of any format (``zero``: int4
    zero points, when the experts have them)."""
    if fmt == "none":
        return data.to(dtype)
    if fmt == "int4":
        return int4_dequantize(data, scale, dtype, zero)
    if fmt == "fp8":
        if data.dtype == torch.float8_e4m3fn and dtype in (torch.bfloat16, torch.float16) and data.is_cuda:
            # Fewer passes on the GPU; the same numbers up to rounding of the product.
            r, c = data.shape[-2:]
            return data.to(dtype) * expand_scale(scale, block, r, c).to(dtype)
        return fp8_dequantize(data, scale, block, dtype)
    raise ValueError(f"unknown expert format {fmt!r}")
