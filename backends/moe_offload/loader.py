"""Reading a Hugging Face-style folder of safetensors, one tensor at a time.

Three layouts are read (see docs/moe-offload.md): a dense release (bf16/fp16/fp32), the block-FP8
release (``quant_method: fp8``, ``weight`` float8_e4m3fn + ``weight_scale_inv``) and
compressed-tensors FP8 (``weight`` + ``weight_scale``: tensor, channel or block). In both FP8
layouts the dense weight is ``weight * scale`` broadcast over blocks, so a float8 weight is paired
with whichever scale sits next to it. Nothing bigger than one tensor is held at a time.
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

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
SKIP_SUFFIXES = ("input_scale", "weight_zero_point", "input_zero_point", "weight_g_idx")


def checkpoint_format(config: dict[str, Any]) -> str:
    """'dense', 'fp8-block' or 'compressed-tensors-fp8' from config.json's quantization_config."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if not method:
        return "dense"
    if method == "fp8":
        return "fp8-block"
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise BackendError("This compressed-tensors checkpoint is not FP8 (weights "
                                   f"{w.get('type')}{w.get('num_bits')}); moe-offload reads FP8 ones only.")
        return "compressed-tensors-fp8"
    raise BackendError(f"moe-offload cannot read checkpoints quantized with {method!r}; use the bf16 or "
                       "an FP8 release of the model.")


def fp8_block_hint(config: dict[str, Any]) -> tuple[int, int] | None:
    q = config.get("quantization_config") or {}
    if q.get("weight_block_size"):
        return tuple(q["weight_block_size"])
    for group in (q.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("strategy") == "block" and w.get("block_structure"):
            return tuple(w["block_structure"])
    return None


@dataclass
class Entry:
    name: str
    weight: Any               # torch.Tensor
    scale: Any | None = None  # for float8 weights
    block: tuple[int, int] | None = None  # the block the scale grid stands for


class Checkpoint:
    """The tensors of a model folder: names, the shard each lives in, and streaming reads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}
        cfg_path = self.folder / "config.json"
        if not cfg_path.exists():
            raise BackendError(f"{self.folder} has no config.json; choose a Hugging Face-style model folder.")
        self.config_dict = json.loads(cfg_path.read_text())
        self.format = checkpoint_format(self.config_dict)
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
            with open(self.folder / shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[shard] = (json.loads(f.read(n)), 8 + n)
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
            f.seek(base + start)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise BackendError(f"{shard} ends early; the download is incomplete.")
                got += n
        return buf.view(getattr(torch, dtype)).reshape(meta["shape"])

    def close(self) -> None:
        self._headers.clear()

    def __len__(self) -> int:
        return len(self.weight_map)

    def entries(self, names: list[str] | None = None) -> Iterator[Entry]:
        """Every weight in shard order, float8 weights with their scale; scales not apart."""
        import torch

        names = names if names is not None else list(self.weight_map)
        order = sorted(names, key=lambda n: (self.weight_map[n], n))
        for name in order:
            suffix = name.rsplit(".", 1)[-1]
            if suffix in SCALE_SUFFIXES or suffix in SKIP_SUFFIXES:
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


def dequantize_entry(entry: Entry, dtype) -> Any:
    """Dense ``dtype`` weight of a resident (non-expert) tensor."""
    import torch

    w = entry.weight
    if entry.scale is None:
        return w.to(dtype)
    r = w.shape[0]
    c = w.shape[1] if w.dim() > 1 else 1
    block = entry.block or quant.fp8_block_of((r, c), tuple(entry.scale.shape))
    s = entry.scale.float().reshape(math.ceil(r / block[0]), -1)
    return quant.fp8_dequantize(w.reshape(r, c), s, block, torch.float32).reshape(w.shape).to(dtype)
