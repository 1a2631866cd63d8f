"""What a checkpoint's config.json says about its quantization, without importing torch (the
memory plan reads it too): the format moe-offload reads the checkpoint as, and an int4
checkpoint's layout. A layout moe-offload does not read gets a sentence saying what to use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moechat.backends.api import BackendError


@dataclass(frozen=True)
class Int4Layout:
    """An int4 checkpoint's layout: ``kind`` compressed-tensors or gptq, the group size, whether
    it has zero points (asymmetric), and what GPTQ adds to a stored zero (1 for GPTQ v1, which
    stores zero - 1; 0 for gptq_v2)."""

    kind: str
    group: int
    zero: bool
    zero_offset: int = 0


def _refuse(what: str) -> BackendError:
    return BackendError(f"moe-offload cannot read this checkpoint: {what}")


def int4_layout(config: dict[str, Any]) -> Int4Layout | None:
    """The int4 layout of config.json's ``quantization_config`` (or a GPTQ ``quantize_config``
    merged into it), None for other checkpoints; a sentence for int4 layouts we do not read."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method == "gptq":
        if q.get("bits") != 4:
            raise _refuse(f"it is {q.get('bits')}-bit GPTQ; moe-offload reads 4-bit GPTQ only.")
        group = q.get("group_size")
        if not isinstance(group, int) or group <= 0:
            raise _refuse(f"its GPTQ group_size is {group} (per channel); moe-offload needs group-wise "
                          "scales (group_size 32 to 128).")
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(f"its GPTQ checkpoint_format is {fmt!r}; moe-offload reads gptq and gptq_v2.")
        return Int4Layout("gptq", group, not q.get("sym", True), 1 if fmt == "gptq" else 0)
    if method != "compressed-tensors":
        return None
    groups = list((q.get("config_groups") or {}).values())
    ints = [g for g in groups if (g.get("weights") or {}).get("type") == "int"]
    if not ints:
        return None
    if len(ints) != len(groups):
        raise _refuse("it mixes integer and float quantization schemes; use a checkpoint with one scheme.")
    found = set()
    for g in ints:
        w = g["weights"]
        fmt = g.get("format") or q.get("format")
        if w.get("num_bits") != 4:
            raise _refuse(f"its weights are int{w.get('num_bits')}; moe-offload reads int4 (W4A16) ones.")
        if fmt != "pack-quantized":
            raise _refuse(f"its int4 weights are stored as {fmt!r}; moe-offload reads pack-quantized ones.")
        if w.get("strategy") != "group" or not w.get("group_size"):
            raise _refuse(f"its int4 scales are per {w.get('strategy')}; moe-offload needs group-wise "
                          "scales (group_size 32 to 128).")
        if (g.get("input_activations") or {}).get("num_bits") not in (None, 16):
            raise _refuse("it quantizes activations too; moe-offload reads weight-only (W4A16) int4.")
        found.add((w["group_size"], not w.get("symmetric", True)))
    if len(found) > 1:
        raise _refuse(f"its int4 groups differ ({sorted(found)}); moe-offload needs one group size and scheme.")
    group, zero = found.pop()
    return Int4Layout("compressed-tensors", group, zero)


def checkpoint_format(config: dict[str, Any]) -> str:
    """'dense', 'fp8-block', 'compressed-tensors-fp8', 'compressed-tensors-int4' or 'gptq-int4'
    from config.json's quantization_config; a sentence for layouts moe-offload does not read."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if not method:
        return "dense"
    if method == "fp8":
        return "fp8-block"
    layout = int4_layout(config)
    if layout is not None:
        return f"{layout.kind}-int4"
    if method == "awq":
        raise _refuse("it is AWQ, whose int4 packing moe-offload does not read; use a GPTQ or "
                      "compressed-tensors W4A16 (pack-quantized) checkpoint, or the bf16 or FP8 release.")
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise BackendError("This compressed-tensors checkpoint is not FP8 (weights "
                                   f"{w.get('type')}{w.get('num_bits')}); moe-offload reads FP8 ones only.")
        return "compressed-tensors-fp8"
    raise BackendError(f"moe-offload cannot read checkpoints quantized with {method!r}; use the bf16 or "
                       "an FP8 release of the model, or a GPTQ or compressed-tensors int4 one.")
