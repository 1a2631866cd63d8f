"""Routed experts in host memory (pinned when a GPU is used), one block per layer and projection.

Per layer there are two projections, laid out as transformers' fused experts are:
``gate_up`` [E, 2I, H] (rows 0:I gate, I:2I up) and ``down`` [E, H, I]. The experts of one layer
are contiguous, so one expert of one projection is a single contiguous slice to copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moechat.backends.moe_offload import quant

STORE_VERSION = 2   # 2: zero points, the scale dtype and the quantizer recorded

# How many weights of checkpoint tensors ``add`` converts together, by the device converting them
# (a batch holds at least one tensor). GPU: one tensor converted alone is a synchronous copy in, a
# dozen kernels of microseconds and a synchronous copy out, so per-tensor overhead (launches,
# synchronizations, pageable copies) was most of a load's conversion time; 32 M weights (32
# [512, 2048] expert tensors: 32 MB of FP8 or 64 MB of bf16 in a pinned staging buffer) make each
# kernel long enough to run at the GPU's bandwidth, while the quantizer's float32 temporaries
# (about six of 128 MB) stay well inside the 2 GiB work area the plan keeps free. CPU: the
# quantizer's passes are memory-bound, and one [512, 2048] tensor at a time was as fast as batches
# of them (bench/convert_speed.py; bigger batches leave the caches and page-fault fresh
# allocations), so only tensors much smaller than a real expert's are batched there: 256 K weights
# keep those temporaries at about 1 MB each, a small part of the load's host peak.
CONVERT_BATCH_WEIGHTS = {"cuda": 32 << 20, "cpu": 256 << 10}


@dataclass
class Proj:
    """One projection of one layer: ``data`` [E, R, C'] plus ``scale`` for quantized formats
    and ``zero`` for int4 experts with zero points (quant.py)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    block: tuple[int, int] | None = None  # fp8 only
    zero: torch.Tensor | None = None      # int4 with zero points only

    @property
    def expert_bytes(self) -> int:
        n = self.data[0].numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                n += t[0].numel() * t.element_size()
        return n

    def empty(self, experts: int, device: torch.device) -> "Proj":
        """Room for ``experts`` experts of this projection on ``device`` (a cache, a ring)."""
        def like(t):
            return None if t is None else torch.empty((experts, *t.shape[1:]), dtype=t.dtype, device=device)
        return Proj(like(self.data), like(self.scale), self.block, like(self.zero))

    def put(self, at: int, src: "Proj", start: int, n: int = 1) -> None:
        """Experts ``start:start+n`` of ``src`` into rows ``at:at+n`` of this one, one copy a tensor
        (asynchronous from pinned host memory to a GPU)."""
        for dst, t in ((self.data, src.data), (self.scale, src.scale), (self.zero, src.zero)):
            if t is not None:
                dst[at:at + n].copy_(t[start:start + n], non_blocking=True)

    def rows(self, start: int, stop: int) -> "Proj":
        """Experts ``start:stop`` of this projection, a view."""
        def cut(t):
            return None if t is None else t[start:stop]
        return Proj(self.data[start:stop], cut(self.scale), self.block, cut(self.zero))


class ExpertStore:
    """Every routed expert of every MoE layer, converted to ``fmt`` as it arrives.

    int4 experts of an int4 checkpoint (``put_int4``) keep the checkpoint's integers and scales:
    ``zero`` says the store keeps per-group zero points, ``scale_dtype`` is the checkpoint's
    scale dtype (bf16 or fp16); our own conversion gives bf16 scales and no zero points."""

    def __init__(self, fmt: str, layers: tuple[int, ...], num_experts: int, hidden: int,
                 intermediate: int, dtype: torch.dtype, group: int = 128, pin: bool = False,
                 zero: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                 convert_on: torch.device | str | None = None):
        """``convert_on``: where ``put`` dequantizes and quantizes a checkpoint tensor (the GPU
        during a load, where there is one: the int4 scale search is tens of times faster there
        than on the CPU; the result is copied back into the host store). None: where the tensor lies."""
        if fmt not in ("none", "int4", "fp8"):
            raise ValueError(f"unknown expert format {fmt!r}")
        if scale_dtype not in quant.INT4_SCALE_DTYPES:
            raise ValueError(f"int4 scales are bf16 or fp16, not {scale_dtype}")
        self.fmt, self.group, self.dtype, self.pin = fmt, group, dtype, pin
        self.zero = zero and fmt == "int4"
        self.scale_dtype = scale_dtype
        self.convert_on = torch.device(convert_on) if convert_on is not None else None
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.layers: dict[int, dict[str, Proj | None]] = {i: {"gate_up": None, "down": None} for i in layers}
        # ``add``'s checkpoint tensors waiting for their batch: key -> [(expert, weight, scale)]
        self._pending: dict[tuple, list] = {}
        self._pending_weights = 0
        # converted batches on their way back from the GPU: (event, copies to make when it is done)
        self._landing: list[tuple] = []
        if fmt == "int4":
            for width in (hidden, intermediate):
                if width % group:
                    raise ValueError(f"int4 group size {group} does not divide {width}; choose a "
                                     "smaller int4_group_size")

    # ---- shapes -------------------------------------------------------------------------
    def proj_shape(self, proj: str) -> tuple[int, int]:
        i, h = self.intermediate, self.hidden
        return (2 * i, h) if proj == "gate_up" else (h, i)

    def _empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _alloc(self, layer: int, proj: str, block: tuple[int, int] | None = None) -> Proj:
        r, c = self.proj_shape(proj)
        e = self.num_experts
        if self.fmt == "none":
            p = Proj(self._empty((e, r, c), self.dtype), None)
        elif self.fmt == "int4":
            p = Proj(self._empty((e, r, c // 2), torch.uint8),
                     self._empty((e, r, c // self.group), self.scale_dtype),
                     zero=self._empty((e, r, c // self.group), torch.uint8) if self.zero else None)
        else:
            br, bc = block
            p = Proj(self._empty((e, r, c), torch.float8_e4m3fn),
                     self._empty((e, math.ceil(r / br), math.ceil(c / bc)), torch.float32), block)
        self.layers[layer][proj] = p
        return p

    def expert_bytes(self) -> int:
        """Bytes of one expert (both projections) in the storage format."""
        for projs in self.layers.values():
            if all(projs.values()):
                return sum(p.expert_bytes for p in projs.values())
        from moechat.backends.moe_offload.plan import expert_bytes
        return expert_bytes(self.fmt, self.hidden, self.intermediate, self.group,
                            torch.empty((), dtype=self.dtype).element_size(), self.zero)

    def total_bytes(self) -> int:
        return self.expert_bytes() * self.num_experts * len(self.layers)

    # ---- filling --------------------------------------------------------------------------
    def _place(self, proj: str) -> tuple[str, int]:
        """(the store's projection, first row) of a checkpoint's gate, up or down tensor."""
        return ("down" if proj == "down" else "gate_up"), {"gate": 0, "up": self.intermediate, "down": 0}[proj]

    def put(self, layer: int, expert: int, proj: str, weight: torch.Tensor,
            scale: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> None:
        """Store one checkpoint tensor of one expert: ``proj`` is gate, up or down; ``weight``
        is dense, or float8 with its ``scale`` (any granularity)."""
        target, row0 = self._place(proj)
        rows = weight.shape[0]
        is_fp8 = weight.dtype == torch.float8_e4m3fn
        if is_fp8 and scale is not None and block is None:
            block = quant.fp8_block_of(tuple(weight.shape), tuple(scale.shape))
        if is_fp8 and scale is None:
            raise ValueError(f"float8 weight of layer {layer} expert {expert} {proj} has no scale")
        p = self.layers[layer][target]
        if self.fmt == "fp8":
            if is_fp8:
                q, s = weight, scale.float().reshape(math.ceil(rows / block[0]), -1)
            else:
                block = (min(128, rows), min(128, weight.shape[1]))
                q, s = quant.fp8_quantize(weight, block)
            if p is None:
                p = self._alloc(layer, target, block)
            if p.block != block or row0 % block[0]:
                q, s = quant.fp8_quantize(quant.fp8_dequantize(q, s, block, torch.float32), p.block)
                block = p.block
            p.data[expert, row0:row0 + rows].copy_(q)
            s0 = row0 // block[0]
            p.scale[expert, s0:s0 + s.shape[0]].copy_(s)
            return
        self._convert(layer, proj, [(expert, weight, scale)], block)
        self._land()

    def add(self, layer: int, expert: int, proj: str, weight: torch.Tensor,
            scale: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> None:
        """``put``, batched: the tensor waits until ``CONVERT_BATCH_WEIGHTS`` weights of the same
        layer, projection and layout have come, which are then converted together (the same
        numbers as ``put``). ``flush`` converts what is left; until then the store is incomplete."""
        is_fp8 = weight.dtype == torch.float8_e4m3fn
        if self.fmt == "fp8" or (is_fp8 and scale is None):
            self.put(layer, expert, proj, weight, scale, block)
            return
        if is_fp8 and block is None:
            block = quant.fp8_block_of(tuple(weight.shape), tuple(scale.shape))
        key = (layer, proj, weight.dtype, tuple(weight.shape), None if scale is None else tuple(scale.shape), block)
        batch = self._pending.setdefault(key, [])
        batch.append((expert, weight, scale))
        self._pending_weights += weight.numel()
        cap = CONVERT_BATCH_WEIGHTS.get(self._converts_on(weight).type, CONVERT_BATCH_WEIGHTS["cpu"])
        if len(batch) * weight.numel() >= cap:
            self._convert(layer, proj, self._pending.pop(key), block)
            self._pending_weights -= len(batch) * weight.numel()
        if self._pending_weights >= 3 * cap:   # projections or layers that never fill a batch
            self._convert_pending()

    def flush(self, release: bool = True) -> None:
        """Convert every tensor ``add`` still holds and wait until all are in the store; then
        (``release``) give the GPU memory of the batches back (the expert cache is sized from the
        free memory after the load) and the pinned staging buffers too, where torch can."""
        self._convert_pending()
        self._land()
        if release and self.convert_on is not None and self.convert_on.type == "cuda":
            torch.cuda.empty_cache()
            release_pinned = getattr(getattr(torch.accelerator, "memory", None), "empty_host_cache", None)
            if release_pinned is not None:
                release_pinned()

    def _convert_pending(self) -> None:
        for (layer, proj, *_, block), batch in self._pending.items():
            self._convert(layer, proj, batch, block)
        self._pending.clear()
        self._pending_weights = 0

    def _converts_on(self, weight: torch.Tensor) -> torch.device:
        """``convert_on`` for int4 conversion; a dense store takes the weights where they lie."""
        return self.convert_on if self.convert_on is not None and self.fmt == "int4" else weight.device

    def _convert(self, layer: int, proj: str, batch: list, block: tuple[int, int] | None) -> None:
        """Dequantize and quantize the tensors of ``batch`` ([(expert, weight, scale)], one layer,
        projection and layout) as one stacked tensor on ``convert_on``. From a GPU the results
        come back without the host waiting, straight into a pinned store (else into pinned
        buffers that ``_land`` copies into the store once they are there), so the GPU converts
        while the next tensors are read; ``_land`` waits for them."""
        target, row0 = self._place(proj)
        p = self.layers[layer][target] or self._alloc(layer, target)
        experts = [e for e, _, _ in batch]
        where = self._converts_on(batch[0][1])
        weight = _stack([w for _, w, _ in batch], where).to(where, non_blocking=True)
        rows = weight.shape[1]
        if batch[0][2] is not None:
            grid = (math.ceil(rows / block[0]), -1)
            scale = _stack([s.float().reshape(grid) for _, _, s in batch], where).to(where, non_blocking=True)
            dense = quant.fp8_dequantize(weight, scale, block, torch.float32)
        else:
            dense = weight
        if self.fmt == "none":
            outs = [(p.data, dense.to(self.dtype))]
        else:
            q, s = quant.int4_quantize(dense, self.group)
            outs = [(p.data, q), (p.scale, s.to(self.scale_dtype))]
            if p.zero is not None:
                outs.append((p.zero, None))
        event = None
        if any(t is not None and t.device.type == "cuda" for _, t in outs):
            if self.pin:   # straight into the pinned store, one copy an expert, none waited for
                for dst, t in outs:
                    for k, e in enumerate(experts):
                        if t is not None:
                            dst[e, row0:row0 + rows].copy_(t[k], non_blocking=True)
                outs = [(dst, t) for dst, t in outs if t is None]
            else:
                outs = [(dst, t if t is None else _to_pinned(t)) for dst, t in outs]
            event = torch.cuda.Event()
            event.record()
        else:
            outs = [(dst, t if t is None else t.to("cpu")) for dst, t in outs]
        self._land()                       # the batch before this one is back by now
        self._landing.append((event, experts, row0, rows, outs))

    def _land(self) -> None:
        """Copy converted batches into the store, once their copies from the device are done."""
        for event, experts, row0, rows, outs in self._landing:
            if event is not None:
                event.synchronize()
            for dst, t in outs:
                for k, e in enumerate(experts):
                    if t is None:
                        dst[e, row0:row0 + rows].fill_(8)    # zero points of symmetric experts
                    else:
                        dst[e, row0:row0 + rows].copy_(t[k])
        self._landing.clear()

    def put_int4(self, layer: int, expert: int, proj: str, packed: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, group: int) -> None:
        """Store one expert tensor of an int4 checkpoint, already in our layout (the loader
        repacks it): ``packed`` uint8 [R, C/2], ``scale`` [R, C/group], ``zero`` uint8
        [R, C/group] or None (8). An int4 store keeps the integers and scales as they are;
        other formats take the dense weights they stand for."""
        if self.fmt != "int4":
            self.put(layer, expert, proj, quant.int4_dequantize(packed, scale.float(), torch.float32, zero))
            return
        if group != self.group:
            raise ValueError(f"int4 experts of group {group} in a store of group {self.group}")
        target, row0 = self._place(proj)
        exact = scale.to(self.scale_dtype)
        if not torch.equal(exact.to(scale.dtype), scale):
            from moechat.backends.api import BackendError
            raise BackendError(f"The int4 scales of layer {layer} expert {expert} {proj} ({scale.dtype}) are "
                               f"not exact in {self.scale_dtype}; moe-offload reads bf16 or fp16 scales.")
        if zero is not None and not self.zero:
            if bool((zero != 8).any()):
                from moechat.backends.api import BackendError
                raise BackendError(f"The int4 experts of layer {layer} have zero points other than 8 although "
                                   "config.json says they are symmetric; the checkpoint is inconsistent.")
            zero = None
        p = self.layers[layer][target] or self._alloc(layer, target)
        rows = slice(row0, row0 + packed.shape[0])
        p.data[expert, rows].copy_(packed)
        p.scale[expert, rows].copy_(exact)
        if p.zero is not None and zero is not None:
            p.zero[expert, rows].copy_(zero)
        elif p.zero is not None:
            p.zero[expert, rows].fill_(8)   # a symmetric tensor in a store with zero points

    def check_complete(self) -> None:
        if self._pending or self._landing:
            raise RuntimeError("experts added to the store are not all converted yet; call flush() first")
        missing = [f"layer {i} {name}" for i, projs in self.layers.items() for name, p in projs.items() if p is None]
        if missing:
            from moechat.backends.api import BackendError
            raise BackendError("The checkpoint has no routed-expert weights for " + ", ".join(missing[:4])
                               + ("..." if len(missing) > 4 else "") + ". Is the model folder complete?")

    def dense(self, layer: int, proj: str, experts=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weights of ``experts`` (all by default): the reference dequantization."""
        p = self.layers[layer][proj]
        idx = slice(None) if experts is None else experts
        return quant.dequantize(self.fmt, p.data[idx], None if p.scale is None else p.scale[idx],
                                dtype or self.dtype, p.block, None if p.zero is None else p.zero[idx])

    @classmethod
    def random(cls, fmt: str, layers: tuple[int, ...], num_experts: int, hidden: int, intermediate: int,
               dtype: torch.dtype, group: int = 128, pin: bool = False, distinct_layers: int = 2,
               seed: int = 0) -> "ExpertStore":
        """A store of random int4 experts made fast (random bytes, not by quantizing), for
        benchmarks at full size without a checkpoint. Layers share ``distinct_layers`` contents."""
        if fmt != "int4":
            raise ValueError("random stores are int4 only")
        store = cls(fmt, layers, num_experts, hidden, intermediate, dtype, group, pin)
        g = torch.Generator().manual_seed(seed)
        for li, layer in enumerate(layers):
            for proj in ("gate_up", "down"):
                p = store._alloc(layer, proj)
                if li < distinct_layers:
                    p.data.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, p.data.view(torch.int32).shape,
                                                                 generator=g, dtype=torch.int32))
                    # scale so each weight is about N(0, 0.02): uniform q in [-8,7] has std ~4.6
                    p.scale.fill_(0.02 / 4.6)
                else:
                    src = store.layers[layers[li % distinct_layers]][proj]
                    p.data.copy_(src.data)
                    p.scale.copy_(src.scale)
        return store

    # ---- the converted-experts cache on disk -------------------------------------------------
    def describe(self, quantizer: str) -> dict:
        """What a saved store must match to be read back: format, group, zero points, scale dtype
        and the quantizer that made the experts (``quant.INT4_QUANTIZER``, or "checkpoint"
        where an int4 checkpoint's own integers were kept)."""
        return {"version": STORE_VERSION, "fmt": self.fmt, "group": self.group, "zero": self.zero,
                "scale_dtype": str(self.scale_dtype), "quantizer": quantizer if self.fmt == "int4" else None}

    def save(self, folder: Path, quantizer: str = quant.INT4_QUANTIZER) -> None:
        """Write the store to ``folder`` atomically (a temporary folder renamed at the end)."""
        from safetensors.torch import save_file

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {**self.describe(quantizer), "layers": {}}
        for layer, projs in self.layers.items():
            tensors = {}
            for name, p in projs.items():
                tensors[f"{name}.data"] = p.data
                if p.scale is not None:
                    tensors[f"{name}.scale"] = p.scale
                if p.zero is not None:
                    tensors[f"{name}.zero"] = p.zero
                meta["layers"][str(layer)] = meta["layers"].get(str(layer), {})
                meta["layers"][str(layer)][name] = list(p.block) if p.block else None
            save_file(tensors, str(tmp / f"layer{layer}.safetensors"))
        (tmp / "store.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def load_saved(self, folder: Path, progress=None, quantizer: str = quant.INT4_QUANTIZER) -> bool:
        """Fill the store from ``save``'s folder; False when it is missing, does not match (another
        format, group or quantizer) or is damaged: those experts are converted anew. The bytes are
        read straight into the store's (pinned) memory."""
        from moechat.backends.moe_offload.loader import DTYPES, read_into, safetensors_header

        try:
            meta = json.loads((folder / "store.json").read_text())
        except (OSError, ValueError):
            return False
        if any(meta.get(k) != v for k, v in self.describe(quantizer).items()):
            return False
        if set(meta["layers"]) != {str(i) for i in self.layers}:
            return False
        for n, layer in enumerate(self.layers):
            path = folder / f"layer{layer}.safetensors"
            try:
                header, base = safetensors_header(path)
                with open(path, "rb", buffering=0) as f:
                    for name in ("gate_up", "down"):
                        block = meta["layers"][str(layer)][name]
                        p = self._alloc(layer, name, tuple(block) if block else None)
                        for part, t in (("data", p.data), ("scale", p.scale), ("zero", p.zero)):
                            if t is None:
                                continue
                            saved = header.get(f"{name}.{part}")
                            if (saved is None or saved["shape"] != list(t.shape)
                                    or f"torch.{DTYPES.get(saved['dtype'])}" != str(t.dtype)):
                                return False
                            read_into(f, base + saved["data_offsets"][0], t)
            except (OSError, ValueError, EOFError):
                return False
            if progress:
                progress(n + 1, len(self.layers))
        return True


def _stack(tensors: list[torch.Tensor], where: torch.device) -> torch.Tensor:
    """The tensors stacked on a new dim 0, in pinned memory where they go to a GPU from the host
    (so the copy over is one DMA that does not hold the host up)."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    pin = torch.device(where).type == "cuda" and tensors[0].device.type == "cpu"
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, device=tensors[0].device,
                      pin_memory=pin)
    return torch.stack(tensors, out=out)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A copy of a GPU tensor on its way into pinned host memory (done once the stream passes it)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
