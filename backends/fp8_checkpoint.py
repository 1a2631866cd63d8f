"""Write a synthetic model (``synthetic:NAME[?layers=N]``) to disk as a block-FP8 checkpoint
folder in the layout of the official Qwen3-Next-80B-A3B-Instruct-FP8 release, with random weights.

For engines that only read checkpoints (vLLM): the 80B widths at reduced depth, e.g.
``synthetic:qwen3-next-80b-a3b?layers=4`` (about 7.8 GB). The layout, from the release's config:
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}``; every 2-D Linear weight not in
that list is float8_e4m3fn with a bf16 ``weight_scale_inv`` of one scale per 128x128 block; routed
experts are stored per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``); everything else is
bf16. Kept in bf16 (modules_to_not_convert): embeddings, lm_head, norms, the router
(``mlp.gate``), ``mlp.shared_expert_gate`` and the Gated DeltaNet's ``A_log``, ``conv1d``,
``dt_bias``, ``in_proj_ba`` and ``norm``.

Random weights are drawn directly as FP8 values with one scale per block, on the GPU when there
is one, and written shard by shard (host memory stays near one shard). The tokenizer is the demo
tokenizer (a few hundred tokens); ``lm_head`` rows past it and of its special tokens are zero and
the rest are scaled up, so sampled tokens are almost always ones the tokenizer turns into text, and
a reply runs to its token limit (as synthetic models drop the end-of-sequence token).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moechat.backends import synthetic

BLOCK = (128, 128)
FP8_MAX = 448.0
# Modules the release keeps in bf16 (matched against full parameter names).
KEEP = re.compile(r"(lm_head|embed_tokens|layernorm|model\.norm|mlp\.gate\.|shared_expert_gate|"
                  r"linear_attn\.(A_log|conv1d|dt_bias|in_proj_ba|norm)|q_norm|k_norm)")
EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
SHARD_BYTES = 2 * 10**9
WEIGHT_STD = 0.02


def module_name(param: str) -> str:
    """The name the release's modules_to_not_convert uses: the module of a weight or bias, the full
    name of a bare parameter (``linear_attn.A_log``; its module, linear_attn, also holds FP8 Linears)."""
    return param.rsplit(".", 1)[0] if param.endswith((".weight", ".bias")) else param


def quantization_config(names: list[str]) -> dict[str, Any]:
    keep = sorted({module_name(n) for n in names if KEEP.search(n)})
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK), "modules_to_not_convert": keep}


def checkpoint_tensors(spec: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of the release layout; kind is 'fp8' (a weight with a
    block scale), or 'bf16'. Experts come per expert, unfused."""
    import transformers
    from accelerate import init_empty_weights

    cfg = synthetic.hf_config(spec)
    with init_empty_weights():
        net = transformers.AutoModelForCausalLM.from_config(cfg)
    for name, p in net.named_parameters():
        m = EXPERTS.match(name)
        if m:
            experts, rows, cols = p.shape
            for e in range(experts):
                if m.group(2) == "gate_up_proj":
                    for i, proj in enumerate(("gate_proj", "up_proj")):
                        yield f"{m.group(1)}.{e}.{proj}.weight", (rows // 2, cols), "fp8"
                else:
                    yield f"{m.group(1)}.{e}.down_proj.weight", (rows, cols), "fp8"
        elif p.dim() == 2 and name.endswith(".weight") and not KEEP.search(name):
            yield name, tuple(p.shape), "fp8"
        else:
            yield name, tuple(p.shape), "bf16"


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return -(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])


def random_tensors(name: str, shape: tuple[int, ...], kind: str, gen: Any, device: Any,
                   vocab_in_tokenizer: int, special_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    import torch

    if kind == "fp8":
        # Values spread over the FP8 range; the block scale brings them to std WEIGHT_STD.
        q = (torch.randn(shape, generator=gen, device=device) * (FP8_MAX / 4)).clamp_(-FP8_MAX, FP8_MAX)
        scale = torch.full(scale_shape(shape), WEIGHT_STD * 4 / FP8_MAX, dtype=torch.bfloat16, device=device)
        return {name: q.to(torch.float8_e4m3fn).cpu(), name + "_scale_inv": scale.cpu()}
    if len(shape) == 1 and ("norm" in name) and "linear_attn" not in name:
        t = torch.zeros(shape, device=device)  # Qwen3-Next's RMSNorm scales by (1 + w)
    elif name.endswith("linear_attn.norm.weight"):
        t = torch.ones(shape, device=device)
    else:
        t = torch.randn(shape, generator=gen, device=device) * WEIGHT_STD
        if name == "lm_head.weight":
            t[vocab_in_tokenizer:] = 0  # tokens the tokenizer lacks never win ...
            t[:vocab_in_tokenizer] *= 10  # ... and the rest win sampling too,
            t[list(special_ids)] = 0  # except the end-of-turn and other special tokens: replies run to their limit
    return {name: t.to(torch.bfloat16).cpu()}


def write(spec: str, folder: str | Path, *, seed: int = 0, device: str | None = None,
          shard_bytes: int = SHARD_BYTES, progress: Any = print, fmt: str = "fp8") -> Path:
    """Write ``spec`` as a block-FP8 checkpoint (``fmt="fp8"``) or in the bf16 release layout
    (``fmt="bf16"``: every tensor bf16, no quantization_config) into ``folder`` (created; must not
    exist). ``synthetic.PROVENANCE`` in the folder names the spec, so a benchmark of the folder can
    extrapolate to the full depth."""
    if fmt not in ("fp8", "bf16"):
        raise ValueError(f"fmt must be fp8 or bf16, not {fmt!r}")
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; give a new folder.")
    part = folder.with_name(folder.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok_src = Path(synthetic.tokenizer_folder(spec))
    for f in tok_src.iterdir():
        if f.is_file():
            shutil.copy(f, part / f.name)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(part))
    vocab_in_tokenizer = len(tokenizer)
    special_ids = tuple(sorted(set(tokenizer.all_special_ids)))

    tensors = list(checkpoint_tensors(spec))
    if fmt == "bf16":
        tensors = [(name, shape, "bf16") for name, shape, _ in tensors]
    cfg = synthetic.config(spec)
    (part / synthetic.PROVENANCE).write_text(json.dumps(cfg.pop("moechat_synthetic")) + "\n")
    cfg["torch_dtype"] = "bfloat16"
    if fmt == "fp8":
        cfg["quantization_config"] = quantization_config([n for n, _, _ in tensors])
    (part / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for t in tensors:
        n = 1
        for d in t[1]:
            n *= d
        nbytes = n * (1 if t[2] == "fp8" else 2)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out: dict[str, Any] = {}
        for name, shape, kind in shard:
            out.update(random_tensors(name, shape, kind, gen, device, vocab_in_tokenizer, special_ids))
        save_file(out, str(part / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update({n: fname for n in out})
        progress(f"wrote {fname} ({total / 1e9:.2f} GB so far)")
    (part / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    part.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic model as a checkpoint folder in a release layout.")
    parser.add_argument("folder")
    parser.add_argument("--model", default="synthetic:qwen3-next-80b-a3b?layers=4")
    parser.add_argument("--format", choices=("fp8", "bf16"), default="fp8",
                        help="fp8: the block-FP8 release layout (default); bf16: the bf16 release layout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.model, args.folder, seed=args.seed, fmt=args.format)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
