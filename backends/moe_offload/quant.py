"""Storage formats of routed experts and their one reference dequantization.

Formats (per projection of a layer, all experts stacked on dim 0):

* ``none``: ``data`` [E, R, C] in the compute dtype.
* ``int4``: group-wise symmetric int4 along the input dim. ``data`` uint8 [E, R, C/2] (low nibble
  = even column, high nibble = odd column, value stored as q + 8 with q in [-8, 7]);
  ``scale`` bf16 [E, R, C/group]. W = (nibble - 8) * scale.
* ``fp8``: ``data`` float8_e4m3fn [E, R, C]; ``scale`` float32 [E, ceil(R/br), ceil(C/bc)] for a block
  (br, bc) that covers per-tensor, per-channel and 128x128 block scales alike. W = data * scale.

``dequantize`` is the one function both the engine and the tests use to turn stored experts back
into dense weights, so "the same dequantized weights" means exactly the same numbers.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0


def int4_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] float -> (packed uint8 [..., R, C/2], scale bf16 [..., R, C/group])."""
    *lead, r, c = w.shape
    if c % group or c % 2:
        raise ValueError(f"int4 group size {group} does not divide the input width {c}")
    wg = w.float().reshape(*lead, r, c // group, group)
    scale = (wg.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(wg / scale.float()).clamp_(-8, 7).to(torch.int16) + 8
    q = q.reshape(*lead, r, c).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).contiguous()


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *lead, r, half = packed.shape
    groups = scale.shape[-1]
    lo = (packed & 0x0F)
    hi = (packed >> 4)
    q = torch.stack((lo, hi), dim=-1).reshape(*lead, r, groups, (2 * half) // groups)
    w = (q.to(dtype) - 8) * scale.to(dtype).unsqueeze(-1)
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
    r, c = data.shape[-2:]
    return (data.to(torch.float32) * expand_scale(scale.float(), block, r, c)).to(dtype)


def dequantize(fmt: str, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """Dense weights [..., R, C] in ``dtype`` from stored experts of any format."""
    if fmt == "none":
        return data.to(dtype)
    if fmt == "int4":
        return int4_dequantize(data, scale, dtype)
    if fmt == "fp8":
        if data.dtype == torch.float8_e4m3fn and dtype in (torch.bfloat16, torch.float16) and data.is_cuda:
            # Fewer passes on the GPU; the same numbers up to rounding of the product.
            r, c = data.shape[-2:]
            return data.to(dtype) * expand_scale(scale, block, r, c).to(dtype)
        return fp8_dequantize(data, scale, block, dtype)
    raise ValueError(f"unknown expert format {fmt!r}")
