"""Reading a Hugging Face-style folder of safetensors, one tensor at a time.

Five layouts are read (see docs/moe-offload.md): a dense release (bf16/fp16/fp32), the block-FP8
release (``quant_method: fp8``, ``weight`` float8_e4m3fn + ``weight_scale_inv``),
compressed-tensors FP8 (``weight`` + ``weight_scale``: tensor, channel or block), and two int4
layouts: compressed-tensors ``pack-quantized`` (``weight_packed`` + ``weight_scale`` [+
``weight_zero_point``]) and GPTQ (``qweight`` + ``qzeros`` + ``scales`` + ``g_idx``). In both FP8
layouts the dense weight is ``weight * scale`` broadcast over blocks, so a float8 weight is paired
with whichever scale sits next to it. int4 weights are repacked, integers and scales as they are,
into the store's layout (quant.py; ``quant_config.Int4Layout``). Nothing bigger than one tensor is held at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moechat.backends.api import BackendError
from moechat.backends.moe_offload import quant
from moechat.backends.moe_offload.quant_config import checkpoint_format, int4_layout

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
SKIP_SUFFIXES = ("input_scale", "weight_zero_point", "input_zero_point", "weight_g_idx", "weight_shape")
GPTQ_SUFFIXES = ("qzeros", "scales", "g_idx")   # read with their qweight


def fp8_block_hint(config: dict[str, Any]) -> tuple[int, int] | None:
    q = config.get("quantization_config") or {}
    if q.get("weight_block_size"):
        return tuple(q["weight_block_size"])
    for group in (q.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("strategy") == "block" and w.get("block_structure"):
            return tuple(w["block_structure"])
    return None


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the header, the file offset its tensors' ``data_offsets`` count from) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_into(f: Any, offset: int, out: Any) -> None:
    """Fill the host tensor ``out`` (contiguous) with the bytes at ``offset`` of the unbuffered file
    ``f``: plain reads straight into its memory (pinned memory too), no mmap and no second copy.
    Raises EOFError where the file ends first. (Reading through safetensors' mmap instead faults the
    file in a little at a time: the converted-expert cache came back at less than half the disk's
    speed that way on the GPU machine; docs/moe-offload.md, "Loading at full size".)"""
    import torch

    f.seek(offset)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"{Path(f.name).name} ends {len(view) - got} bytes early")
        got += n


@dataclass
class Entry:
    name: str
    weight: Any               # torch.Tensor; for int4 weights uint8 [R, C/2] in the store's layout
    scale: Any | None = None  # for float8 and int4 weights
    block: tuple[int, int] | None = None  # the block the scale grid stands for
    zero: Any | None = None   # int4 zero points uint8 [R, C/group], or None (8)
    group: int | None = None  # int4 weights: the group size (None for other weights)


class Checkpoint:
    """The tensors of a model folder: names, the shard each lives in, and streaming reads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}
        cfg_path = self.folder / "config.json"
        if not cfg_path.exists():
            raise BackendError(f"{self.folder} has no config.json; choose a Hugging Face-style model folder.")
        self.config_dict = json.loads(cfg_path.read_text())
        gptq = self.folder / "quantize_config.json"   # older GPTQ folders keep it apart
        if not self.config_dict.get("quantization_config") and gptq.exists():
            self.config_dict["quantization_config"] = {"quant_method": "gptq", **json.loads(gptq.read_text())}
        self.format = checkpoint_format(self.config_dict)
        self.int4 = int4_layout(self.config_dict)
        self.block_hint = fp8_block_hint(self.config_dict)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise BackendError(f"{self.folder} has no .safetensors weights.")
            weight_map = {}
            for f in files:
                for k in self._header(f.name)[0]:
                    if k != "__metadata__":
                        weight_map[k] = f.name
        self.weight_map: dict[str, str] = {k: v for k, v in weight_map.items() if k != "__metadata__"}
        self.shards = sorted(set(weight_map.values()))

    def fingerprint(self) -> str:
        """Changes when any shard changes: folder, names, sizes and modification times."""
        h = hashlib.sha256(str(self.folder.resolve()).encode())
        for s in self.shards:
            st = (self.folder / s).stat()
            h.update(f"{s}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:20]

    def _header(self, shard: str) -> tuple[dict[str, Any], int]:
        if shard not in self._headers:
            self._headers[shard] = safetensors_header(self.folder / shard)
        return self._headers[shard]

    def get(self, name: str):
        """One tensor, read with plain file reads into fresh memory (no mmap, so pages of the
        checkpoint never count towards this process's memory)."""
        import torch

        shard = self.weight_map[name]
        header, base = self._header(shard)
        meta = header[name]
        dtype = DTYPES.get(meta["dtype"])
        if dtype is None:
            raise BackendError(f"{name} has dtype {meta['dtype']}, which moe-offload does not read.")
        start, end = meta["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.folder / shard, "rb", buffering=0) as f:
            try:
                read_into(f, base + start, buf)
            except EOFError:
                raise BackendError(f"{shard} ends early; the download is incomplete.") from None
        return buf.view(getattr(torch, dtype)).reshape(meta["shape"])

    def int4_scale_dtype(self, is_expert) -> Any:
        """The torch dtype of the int4 scales of the first tensor ``is_expert(name)`` accepts
        (bf16 where they are float32: the store checks that they are exact)."""
        import torch

        for name in self.weight_map:
            if is_expert(name) and name.endswith((".scales", ".weight_scale")):
                header, _ = self._header(self.weight_map[name])
                dtype = getattr(torch, DTYPES.get(header[name]["dtype"], "bfloat16"))
                return dtype if dtype in quant.INT4_SCALE_DTYPES else torch.bfloat16
        return torch.bfloat16

    def close(self) -> None:
        self._headers.clear()

    def __len__(self) -> int:
        return len(self.weight_map)

    def entries(self, names: list[str] | None = None) -> Iterator[Entry]:
        """Every weight in shard order, float8 weights with their scale; scales not apart."""
        import torch

        names = names if names is not None else list(self.weight_map)
        order = sorted(names, key=lambda n: (self.weight_map[n], n))
        gptq = self.int4 is not None and self.int4.kind == "gptq"
        for name in order:
            suffix = name.rsplit(".", 1)[-1]
            if suffix in SCALE_SUFFIXES or suffix in SKIP_SUFFIXES or (gptq and suffix in GPTQ_SUFFIXES):
                continue
            if suffix in ("weight_packed", "qweight") and self.int4 is not None:
                yield self._int4_entry(name)
                continue
            t = self.get(name)
            scale = None
            if t.dtype == torch.float8_e4m3fn:
                base = name[: -len("weight")] if name.endswith("weight") else name + "."
                for s in SCALE_SUFFIXES:
                    if base + s in self.weight_map:
                        scale = self.get(base + s)
                        break
                if scale is None:
                    raise BackendError(f"The float8 tensor {name} has no weight_scale or weight_scale_inv "
                                       "next to it; the checkpoint is incomplete or in a layout moe-offload "
                                       "does not know.")
            block = None
            if scale is not None:
                r = t.shape[0]
                c = t.shape[1] if t.dim() > 1 else 1
                block = quant.fp8_block_of((r, c), tuple(scale.shape), self.block_hint)
            yield Entry(name, t, scale, block)
        self.close()

    def _int4_entry(self, name: str) -> Entry:
        """An int4 weight with its scales (and zero points) repacked into the store's layout."""
        layout = self.int4
        base = name.rsplit(".", 1)[0] + "."
        if layout.kind == "gptq":
            packed, scale, zero = gptq_to_store(self.get(base + "qweight"), self.get(base + "scales"),
                                                self.get(base + "qzeros"), layout.zero_offset)
            g_idx = self.get(base + "g_idx") if base + "g_idx" in self.weight_map else None
        else:
            shape = tuple(int(v) for v in self.get(base + "weight_shape").tolist())
            zp = self.get(base + "weight_zero_point") if base + "weight_zero_point" in self.weight_map else None
            packed, scale, zero = compressed_tensors_to_store(self.get(base + "weight_packed"),
                                                               self.get(base + "weight_scale"), zp, shape)
            g_idx = self.get(base + "weight_g_idx") if base + "weight_g_idx" in self.weight_map else None
        c = 2 * packed.shape[1]
        group = layout.group
        if scale.shape[-1] * group != c or scale.shape[0] != packed.shape[0]:
            raise BackendError(f"{name} has {scale.shape[1]} scale groups for {c} inputs, not groups of "
                               f"{layout.group} as config.json says; the checkpoint is inconsistent.")
        if g_idx is not None:
            import torch

            if not torch.equal(g_idx.long(), torch.arange(c) // group):
                raise BackendError(
                    f"{name} was quantized with act-order (desc_act / actorder=group: its g_idx puts columns "
                    "in groups out of order), which moe-offload's int4 kernels do not read; use a checkpoint "
                    "quantized without act-order (or with static_groups), or the bf16 or FP8 release.")
        return Entry(base + "weight", packed, scale, None, zero, group)


def _nibbles(t, count: int, dim: int):
    """int32 words -> their ``count`` 4- or 8-bit fields, lowest first, as a new dim after ``dim``
    merged into it (so word w's field k lands at index count * w + k)."""
    import torch

    bits = 32 // count
    fields = torch.stack([(t >> (bits * k)) & ((1 << bits) - 1) for k in range(count)], dim=dim + 1)
    shape = list(t.shape)
    shape[dim] *= count
    return fields.reshape(shape).to(torch.uint8)


def compressed_tensors_to_store(packed, scale, zero_point, shape: tuple[int, int]):
    """compressed-tensors pack-quantized -> (uint8 [R, C/2], scale [R, C/G], zero uint8 [R, C/G] or None).

    ``weight_packed`` int32 [R, C/8] holds q + 8 (q signed in [-8, 7]) of columns 8w..8w+7 in bits
    0-3, 4-7, ... of word w: its bytes are two columns each, low nibble first, which is our layout.
    ``weight_zero_point`` int32 [ceil(R/8), C/G] packs the zero points (z + 8) the same way along
    the rows. W = (q - z) * scale = (nibble - zero nibble) * scale."""
    r, c = shape
    if c % 8 or tuple(packed.shape) != (r, c // 8):
        raise BackendError(f"weight_packed has shape {tuple(packed.shape)} for a weight of shape {shape}; "
                           "moe-offload reads int4 weights whose input width is a multiple of 8.")
    data = _nibbles(packed, 4, 1)                       # bytes: [R, C/2]
    zero = None
    if zero_point is not None:
        zero = _nibbles(zero_point, 8, 0)[:r]           # rows 8w..8w+7 of word row w
    return data.contiguous(), scale.contiguous(), zero


def gptq_to_store(qweight, scales, qzeros, zero_offset: int):
    """GPTQ -> (uint8 [R, C/2], scale [R, C/G], zero uint8 [R, C/G]).

    ``qweight`` int32 [C/8, R] holds the unsigned q of inputs 8w..8w+7 of output r in bits 0-3,
    4-7, ... of word [w, r]; ``qzeros`` int32 [C/G, R/8] the zero points of outputs 8w..8w+7 the
    same way, stored as zero - 1 in GPTQ v1 (``zero_offset`` 1). ``scales`` [C/G, R].
    W[r, c] = (q - zero) * scale."""
    data = _nibbles(qweight, 4, 0).t()                   # bytes along the inputs: [R, C/2]
    zero = _nibbles(qzeros, 8, 1).t() + zero_offset      # [R, C/G], up to 16
    return data.contiguous(), scales.t().contiguous(), zero.contiguous()


def dequantize_entry(entry: Entry, dtype) -> Any:
    """Dense ``dtype`` weight of a resident (non-expert) tensor."""
    import torch

    w = entry.weight
    if entry.group is not None:
        return quant.int4_dequantize(w, entry.scale.float(), torch.float32, entry.zero).to(dtype)
    if entry.scale is None:
        return w.to(dtype)
    r = w.shape[0]
    c = w.shape[1] if w.dim() > 1 else 1
    block = entry.block or quant.fp8_block_of((r, c), tuple(entry.scale.shape))
    s = entry.scale.float().reshape(math.ceil(r / block[0]), -1)
    return quant.fp8_dequantize(w.reshape(r, c), s, block, torch.float32).reshape(w.shape).to(dtype)
