"""Checkpoint writers and reference models for the moe-offload tests.

Writes a model's weights in the real layouts (dense release, block-FP8 release, compressed-tensors
FP8, compressed-tensors int4 pack-quantized, GPTQ), sharded with a ``model.safetensors.index.json``,
and builds the transformers reference model from dense weights (experts fused as transformers
expects). The int4 writers quantize and pack as the producing libraries do, written out here
independently of moe-offload's reader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from moechat.backends.moe_offload import quant
from moechat.backends.moe_offload.loader import Checkpoint

EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")

# Block-FP8 release: modules kept in bf16 (docs/facts.md, checkpoint layouts).
FP8_KEEP = re.compile(r"(lm_head|embed_tokens|layernorm|mlp\.gate\.|shared_expert_gate|linear_attn\.(A_log|conv1d|dt_bias|in_proj_ba|norm)|q_norm|k_norm|model\.norm)")
# compressed-tensors recipe for Qwen3-Next: ignore lm_head, mlp.gate, shared_expert_gate, linear_attn.*
CT_KEEP = re.compile(r"(lm_head|embed_tokens|norm|mlp\.gate\.|shared_expert_gate|linear_attn\.)")


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.get(n).float() for n in ck.weight_map if n.endswith("weight") or "A_log" in n or "dt_bias" in n}


def copy_side_files(src: Path, dst: Path, quantization_config: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quantization_config:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def write_sharded(tensors: dict[str, torch.Tensor], dst: Path, shards: int = 3) -> None:
    from safetensors.torch import save_file

    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def is_linear_weight(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight")


def write_dense(state, src: Path, dst: Path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    copy_side_files(src, dst, None)
    out = {n: t.to(dtype) for n, t in state.items()}
    write_sharded(out, dst)
    return {n: t.float() for n, t in out.items()}


def write_block_fp8(state, src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """The official block-FP8 layout; returns the dense weights it stands for."""
    keep = sorted({n.rsplit(".", 1)[0] for n in state if FP8_KEEP.search(n)})
    copy_side_files(src, dst, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128], "modules_to_not_convert": keep})
    out, dense = {}, {}
    for n, t in state.items():
        if is_linear_weight(n, t) and not FP8_KEEP.search(n):
            q, s = quant.fp8_quantize(t, (128, 128))
            s = s.to(torch.bfloat16)
            out[n], out[n + "_scale_inv"] = q, s
            dense[n] = quant.fp8_dequantize(q, s.float(), (128, 128), torch.float32)
        else:
            out[n] = t.to(torch.bfloat16)
            dense[n] = out[n].float()
    write_sharded(out, dst)
    return dense


def write_ct_fp8(state, src: Path, dst: Path, strategy: str = "channel", keep: re.Pattern = CT_KEEP) -> dict[str, torch.Tensor]:
    """compressed-tensors FP8 (llm-compressor's Qwen3-Next recipe); channel or block weight scales.
    ``keep``: which weights stay unquantized (the recipe's ignore list by default)."""
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "block_structure": [128, 128] if strategy == "block" else None}
    qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$", "re:.*linear_attn.*"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                                "dynamic": True, "symmetric": True}}}}
    copy_side_files(src, dst, qcfg)
    out, dense = {}, {}
    for n, t in state.items():
        if is_linear_weight(n, t) and not keep.search(n):
            block = (128, 128) if strategy == "block" else (1, t.shape[1])
            q, s = quant.fp8_quantize(t, block)
            s = s.to(torch.bfloat16)
            out[n], out[n + "_scale"] = q, s
            dense[n] = quant.fp8_dequantize(q, s.float(), block, torch.float32)
        else:
            out[n] = t.to(torch.bfloat16)
            dense[n] = out[n].float()
    write_sharded(out, dst)
    return dense


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unsigned 4-bit values -> int32 words of 8, the first in bits 0-3, along ``dim`` (0 or 1):
    compressed-tensors' ``pack_to_int32`` and GPTQ's packing alike."""
    v = values.to(torch.int64)
    v = v.reshape(v.shape[0] // 8, 8, v.shape[1]) if dim == 0 else v.reshape(v.shape[0], v.shape[1] // 8, 8)
    words = sum(v.select(dim + 1, i) << (4 * i) for i in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def int4_groups(t: torch.Tensor, group: int, sym: bool, scale_dtype):
    """(q unsigned [R, C], zero [R, C/G] unsigned, scale [R, C/G] in scale_dtype) so that
    W ~ (q - zero) * scale; symmetric: zero 8 and scale = max |w| / 7.5."""
    r, c = t.shape
    g = t.reshape(r, c // group, group)
    if sym:
        scale = (g.abs().amax(-1) / 7.5).clamp_min(1e-6).to(scale_dtype)
        zero = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp_min(1e-6).to(scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.int64)
    q = (torch.round(g / scale.float()[..., None]) + zero[..., None]).clamp(0, 15).to(torch.int64)
    return q.reshape(r, c), zero, scale


def int4_dense(q, zero, scale, group: int) -> torch.Tensor:
    r, c = q.shape
    return ((q.reshape(r, c // group, group) - zero[..., None]).float() * scale.float()[..., None]).reshape(r, c)


def int4_target(name: str, t: torch.Tensor, group: int) -> bool:
    """The weights an int4 recipe quantizes here: every Linear but the ignore list of
    llm-compressor's Qwen3-Next recipes (lm_head, router gates, linear attention)."""
    return is_linear_weight(name, t) and not CT_KEEP.search(name) and t.shape[1] % group == 0 and t.shape[0] % 8 == 0


def write_ct_int4(state, src: Path, dst: Path, sym: bool, group: int = 16) -> dict[str, torch.Tensor]:
    """compressed-tensors W4A16 pack-quantized: ``weight_packed`` int32 [R, C/8] (q + 8, signed q),
    ``weight_scale`` bf16 [R, C/G], ``weight_shape``, and, asymmetric, ``weight_zero_point`` int32
    [R/8, C/G] packed along the rows."""
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group, "symmetric": sym,
               "dynamic": False, "actorder": None}
    copy_side_files(src, dst, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                               "quantization_status": "compressed",
                               "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$",
                                          "re:.*linear_attn.*"],
                               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                             "input_activations": None, "format": "pack-quantized"}}})
    out, dense = {}, {}
    for n, t in state.items():
        if int4_target(n, t, group):
            q, zero, scale = int4_groups(t, group, sym, torch.bfloat16)
            base = n[: -len("weight")]
            out[base + "weight_packed"] = pack_int32(q, 1)        # unsigned = signed q + 8
            out[base + "weight_scale"] = scale
            out[base + "weight_shape"] = torch.tensor(t.shape)
            if not sym:
                out[base + "weight_zero_point"] = pack_int32(zero, 0)
            dense[n] = int4_dense(q, zero, scale, group)
        else:
            out[n] = t.to(torch.bfloat16)
            dense[n] = out[n].float()
    write_sharded(out, dst)
    return dense


def write_gptq(state, src: Path, dst: Path, sym: bool, group: int = 16, separate_config: bool = False,
               g_idx=None) -> dict[str, torch.Tensor]:
    """GPTQ v1: ``qweight`` int32 [C/8, R] packed along the inputs, ``qzeros`` int32 [C/G, R/8]
    holding zero - 1, ``scales`` fp16 [C/G, R], ``g_idx`` int32 [C]. ``separate_config``: the
    older ``quantize_config.json`` beside config.json. ``g_idx``: a function (C -> g_idx) to
    write act-order groups."""
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": g_idx is not None, "sym": sym,
            "checkpoint_format": "gptq"}
    copy_side_files(src, dst, None if separate_config else qcfg)
    if separate_config:
        (dst / "quantize_config.json").write_text(json.dumps({k: v for k, v in qcfg.items() if k != "quant_method"}))
    out, dense = {}, {}
    for n, t in state.items():
        if int4_target(n, t, group):
            q, zero, scale = int4_groups(t, group, sym, torch.float16)
            stored = (zero - 1) & 15                              # v1 stores zero - 1 (0 wraps to 15)
            base = n[: -len("weight")]
            out[base + "qweight"] = pack_int32(q.t().contiguous(), 0)
            out[base + "qzeros"] = pack_int32(stored.t().contiguous(), 1)
            out[base + "scales"] = scale.t().contiguous()
            c = t.shape[1]
            out[base + "g_idx"] = (torch.arange(c) // group if g_idx is None else g_idx(c)).to(torch.int32)
            dense[n] = int4_dense(q, stored + 1, scale, group)    # as GPTQ v1 kernels read it
        else:
            out[n] = t.to(torch.bfloat16)
            dense[n] = out[n].float()
    write_sharded(out, dst)
    return dense


def reference_model(folder: Path, dense: dict[str, torch.Tensor]):
    """transformers' own model in float32 with exactly the weights ``dense`` (per-expert names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for n, t in dense.items():
            m = EXPERT_RE.match(n)
            if m:
                experts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t
            elif n in params:
                params[n].copy_(t)
        for (layer, e), w in experts.items():
            mod = model.model.layers[layer].mlp.experts
            mod.gate_up_proj[e].copy_(torch.cat([w["gate"], w["up"]], 0))
            mod.down_proj[e].copy_(w["down"])
    return model


def set_reference_experts(model, engine) -> None:
    """Overwrite the reference model's experts with the engine's dequantized stored experts."""
    with torch.no_grad():
        for layer in engine.store.layers:
            mod = model.model.layers[layer].mlp.experts
            mod.gate_up_proj.copy_(engine.store.dense(layer, "gate_up", dtype=torch.float32))
            mod.down_proj.copy_(engine.store.dense(layer, "down", dtype=torch.float32))
