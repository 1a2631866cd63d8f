"""Loading a model folder into an ``Engine``: one streaming pass over the checkpoint.

Resident tensors go straight to their place on the compute device (float8 ones dequantized);
routed experts are converted in batches into the ``ExpertStore`` (``ExpertStore.add``). Converted
experts are then written to a disk cache, so the next load of the same folder and format reads
them back as they are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from moechat.backends.api import BackendError, Progress
from moechat.backends.moe_offload import quant
from moechat.backends.moe_offload.adapters import adapter_for
from moechat.backends.moe_offload.engine import Engine, Options
from moechat.backends.moe_offload.loader import Checkpoint, dequantize_entry
from moechat.backends.moe_offload.plan import int4_group
from moechat.backends.moe_offload.store import ExpertStore


def default_cache_dir() -> Path:
    env = os.environ.get("MOECHAT_HOME")
    if env:
        return Path(env) / "cache" / "moe-offload"
    import platformdirs
    return Path(platformdirs.user_cache_dir("moechat")) / "moe-offload"


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # weights are dequantized or converted by us
    return config


def random_resident(model: torch.nn.Module) -> None:
    """Random resident weights in place, in the ranges a trained model has."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.empty(p.shape, device=p.device).uniform_(1, 16).log())
            elif n.endswith("dt_bias") or n.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()              # zero-centred RMSNorm weights: scale 1
            else:
                p.normal_(0.0, 0.02)


def synthetic_engine(spec: str, options: Options, progress=lambda p: None) -> Engine:
    """An engine for a ``synthetic:`` spec (moechat.backends.synthetic): the real shapes, random weights
    built in memory, int4 experts made as random bytes (no checkpoint, no quantization pass)."""
    from moechat.backends import synthetic

    if options.expert_format != "int4":
        raise BackendError("Synthetic models are built with int4 experts; set expert_format to int4.")
    t_start = time.perf_counter()
    config = synthetic.hf_config(spec)
    adapter = adapter_for(config.model_type)
    shapes = adapter.shapes(config)
    progress(Progress("Making random int4 experts in host memory"))
    group = int4_group(options.int4_group_size, shapes.hidden, shapes.intermediate)
    store = ExpertStore.random("int4", shapes.moe_layers, shapes.num_experts, shapes.hidden, shapes.intermediate,
                               options.dtype, group, pin=torch.device(options.device).type == "cuda")
    progress(Progress("Placing random resident weights"))
    engine = Engine.assemble(config, adapter, store, options, random_resident)
    engine.info.update({"checkpoint_format": "synthetic", "experts_from_disk_cache": False,
                        "load_s": round(time.perf_counter() - t_start, 2), "model_type": config.model_type})
    return engine


def load_engine(folder: str | Path, options: Options, progress=lambda p: None) -> Engine:
    folder = Path(folder)
    t_start = time.perf_counter()
    progress(Progress("Reading the checkpoint index"))
    ckpt = Checkpoint(folder)
    config = load_config(folder)
    adapter = adapter_for(config.model_type)
    shapes = adapter.shapes(config)
    dev = torch.device(options.device)
    # an int4 checkpoint's experts keep their integers, scales (and zero points): its group wins
    native = ckpt.int4 if options.expert_format == "int4" else None
    group, zero, scale_dtype = int4_group(options.int4_group_size, shapes.hidden, shapes.intermediate), False, torch.bfloat16
    quantizer = quant.INT4_QUANTIZER
    if native is not None:
        group, zero, quantizer = native.group, native.zero, "checkpoint"
        scale_dtype = ckpt.int4_scale_dtype(lambda n: adapter.parse_expert(n) is not None)
    store = ExpertStore(options.expert_format, shapes.moe_layers, shapes.num_experts, shapes.hidden,
                        shapes.intermediate, options.dtype, group, pin=dev.type == "cuda", zero=zero,
                        scale_dtype=scale_dtype, convert_on=dev if dev.type == "cuda" else None)
    names = [n for n in ckpt.weight_map if not adapter.skip(n)]
    cached_from = None
    cache_path = None
    if options.expert_format != "none":
        root = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
        # the quantizer is part of the key: experts converted by an older one are converted anew
        key = f"-{quantizer}" if options.expert_format == "int4" else ""
        cache_path = root / f"{ckpt.fingerprint()}-{options.expert_format}-g{group}{key}"
        if store.load_saved(cache_path, lambda d, t: progress(Progress("Reading converted experts from the cache", d, t, "layers")),
                            quantizer):
            cached_from = str(cache_path)
            names = [n for n in names if adapter.parse_expert(n) is None]

    def fill(model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        loaded: set[str] = set()
        total = len(names)
        done = 0
        for entry in ckpt.entries(names):
            done += 1
            parsed = adapter.parse_expert(entry.name)
            if parsed is not None:
                layer, expert, proj, suffix = parsed
                if suffix == "weight" and layer in store.layers and entry.group is not None:
                    store.put_int4(layer, expert, proj, entry.weight, entry.scale, entry.zero, entry.group)
                elif suffix == "weight" and layer in store.layers:
                    store.add(layer, expert, proj, entry.weight, entry.scale, entry.block)
            elif entry.name in params:
                p = params[entry.name]
                w = dequantize_entry(entry, p.dtype)
                if tuple(w.shape) != tuple(p.shape):
                    raise BackendError(f"{entry.name} has shape {tuple(w.shape)} in the checkpoint but the "
                                       f"config asks for {tuple(p.shape)}; config.json and weights disagree.")
                with torch.no_grad():
                    p.copy_(w)
                loaded.add(entry.name)
            if done % 16 == 0 or done == total:
                progress(Progress("Loading weights" + (" and converting experts" if cached_from is None and
                                                       options.expert_format != "none" else ""),
                                  done, total, "tensors"))
        store.flush()
        missing = [n for n in params if n not in loaded]
        if missing == ["lm_head.weight"] and getattr(config, "tie_word_embeddings", False):
            with torch.no_grad():
                params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
            missing = []
        if missing:
            raise BackendError("The checkpoint lacks weights the model needs: " + ", ".join(missing[:5])
                               + ("..." if len(missing) > 5 else "") + ".")
        store.check_complete()

    engine = Engine.assemble(config, adapter, store, options, fill)
    if cache_path is not None and cached_from is None:
        progress(Progress("Writing converted experts to the cache"))
        try:
            store.save(cache_path, quantizer)
        except OSError as exc:  # a full disk must not fail the load
            engine.info["expert_cache_write_error"] = str(exc)
    engine.info.update({
        "checkpoint_format": ckpt.format, "experts_from_disk_cache": cached_from is not None,
        "load_s": round(time.perf_counter() - t_start, 2), "model_type": config.model_type,
    })
    if options.expert_format == "int4":
        engine.info["int4_group"] = group
    return engine
