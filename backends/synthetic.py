"""Synthetic models: full shapes, random weights, built in memory. No checkpoint needed.

A model setting of the form ``synthetic:NAME[?layers=N]`` names one:

- ``synthetic:qwen3-next-80b-a3b``: Qwen3-Next-80B-A3B's shapes (the release config);
- ``synthetic:tiny``: the demo model's tiny shapes (for tests);
- ``synthetic:small``: a few hundred MB, for checking memory plans against measurement.

``?layers=N`` keeps every width and cuts the depth to N layers (for backends that cannot hold 48);
the benchmark extrapolates per-layer cost back to the full depth and says so.

Each backend builds the weights in the format it needs; this module has the shared parts:
parsing the spec, the config dict, a tokenizer (the demo tokenizer, trained once into the data
dir) and random-weight construction of a transformers model on the meta device, materialized
straight onto the device accelerate's device map gives each tensor (no second copy).

The end-of-sequence token is removed from synthetic configs so a generation always runs to
``max_new_tokens``: random weights would otherwise stop at a random point.

Parsing and configs are cheap (no torch); building imports torch and transformers.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from moechat.backends.api import BackendError, Progress, ProgressCallback

PREFIX = "synthetic:"
# A checkpoint folder written from a synthetic spec (moechat.backends.fp8_checkpoint) holds this
# file: the spec's name, its depth and the full depth, so a benchmark of the folder extrapolates.
PROVENANCE = "moechat_synthetic.json"

# Qwen3-Next-80B-A3B-Instruct's config.json, a copy of the release's shapes (docs/facts.md):
# 48 layers, 36 Gated DeltaNet + 12 gated attention, 512 experts. Read when asked for.
QWEN3_NEXT_80B_A3B_FILE = Path(__file__).resolve().parent / "moe_offload" / "qwen3_next_80b.json"


def qwen3_next_80b_a3b() -> dict[str, Any]:
    return json.loads(QWEN3_NEXT_80B_A3B_FILE.read_text())


# The demo model's shapes (moechat.backends.demo.tiny_config("qwen3_next")), as a plain dict.
TINY: dict[str, Any] = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 384,
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "num_hidden_layers": 4, "intermediate_size": 96, "full_attention_interval": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1,
    "norm_topk_prob": True, "partial_rotary_factor": 0.25, "hidden_act": "silu", "mlp_only_layers": [],
    "torch_dtype": "float32",
}

# Big enough that weights dominate a worker's memory (about 0.3 GB in float32), small enough for CI.
SMALL: dict[str, Any] = dict(
    TINY, hidden_size=256, num_attention_heads=8, head_dim=32, num_hidden_layers=4, intermediate_size=512,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=64, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256,
    vocab_size=4096,
)

CONFIGS = {"qwen3-next-80b-a3b": qwen3_next_80b_a3b, "tiny": lambda: TINY, "small": lambda: SMALL}


def known_config(name: str) -> dict[str, Any]:
    """A fresh copy of a synthetic model's full config."""
    return copy.deepcopy(CONFIGS[name]())


@dataclass(frozen=True)
class Spec:
    name: str
    layers: int | None = None

    def __str__(self) -> str:
        return PREFIX + self.name + (f"?layers={self.layers}" if self.layers else "")


def is_synthetic(model: str | None) -> bool:
    return bool(model) and str(model).startswith(PREFIX)


def parse(model: str) -> Spec:
    """``synthetic:NAME[?layers=N]`` -> Spec, or BackendError with a sentence."""
    if not is_synthetic(model):
        raise BackendError(f"{model!r} is not a synthetic model; those start with {PREFIX!r}.")
    body = model[len(PREFIX):]
    name, _, query = body.partition("?")
    if name not in CONFIGS:
        raise BackendError(f"There is no synthetic model {name!r}. Known: {', '.join(sorted(CONFIGS))}.")
    layers = None
    params = parse_qs(query) if query else {}
    unknown = set(params) - {"layers"}
    if unknown:
        raise BackendError(f"{model}: unknown option {sorted(unknown)[0]!r}; the only option is layers=N.")
    if "layers" in params:
        try:
            layers = int(params["layers"][-1])
        except ValueError:
            raise BackendError(f"{model}: layers must be a whole number.") from None
        full = known_config(name)["num_hidden_layers"]
        if not 1 <= layers <= full:
            raise BackendError(f"{model}: layers must be between 1 and {full}.")
    return Spec(name, layers)


def config(model: str | Spec) -> dict[str, Any]:
    """The config dict of a synthetic spec: depth cut to ``layers``, no end-of-sequence token."""
    spec = model if isinstance(model, Spec) else parse(model)
    cfg = known_config(spec.name)
    if spec.layers:
        cfg["num_hidden_layers"] = spec.layers
        if cfg.get("model_type") == "qwen3_next" and spec.layers < cfg.get("full_attention_interval", 4):
            # keep at least one attention layer so KV cache costs show up
            cfg["layer_types"] = ["linear_attention"] * (spec.layers - 1) + ["full_attention"]
    cfg["eos_token_id"] = None
    cfg["moechat_synthetic"] = {"name": spec.name, "layers": spec.layers,
                                "full_layers": known_config(spec.name)["num_hidden_layers"]}
    return cfg


def written_from(folder: str | Path) -> Spec | None:
    """The synthetic spec a checkpoint folder was written from (its PROVENANCE file); None for any
    other folder."""
    try:
        meta = json.loads((Path(folder) / PROVENANCE).read_text())
        spec = Spec(str(meta["name"]), meta["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return spec if spec.name in CONFIGS else None


def full_layers(model: str | Spec) -> int:
    spec = model if isinstance(model, Spec) else parse(model)
    return known_config(spec.name)["num_hidden_layers"]


def model_info(model: str) -> Any:
    """The ModelInfo of a synthetic spec (what ``BackendManager.resolve_model`` returns)."""
    from moechat.backends.shapes import model_from_config
    spec = parse(model)
    cfg = config(spec)
    return model_from_config(cfg, path=str(spec), dtype=cfg.get("torch_dtype"))


def tokenizer_folder(model: str, data_dir: Path | None = None) -> str:
    """A folder with a tokenizer for ``model``: the demo tokenizer (trained once into the data
    dir) for synthetic specs; ``model`` itself otherwise."""
    if not is_synthetic(model):
        return model
    if data_dir is None:
        from moechat.backends.machine import data_dir as default_data_dir
        data_dir = default_data_dir()
    folder = Path(data_dir) / "synthetic" / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from moechat.backends.demo import train_tokenizer
        tmp = folder.with_name(f"tokenizer.partial-{os.getpid()}")
        train_tokenizer(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def hf_config(model: str) -> Any:
    """The transformers config object of a synthetic spec."""
    import transformers
    cfg = config(model)
    cfg.pop("moechat_synthetic", None)
    cfg.pop("architectures", None)
    cfg.pop("transformers_version", None)
    dtype = cfg.pop("torch_dtype", None)
    out = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    out.architectures = config(model).get("architectures")
    if dtype:
        out.dtype = dtype
    return out


class RandomFill:
    """Fills tensors with seeded normal noise fast: slices at random offsets of one random pool
    per device and dtype, so every row differs (routers do not favour a few experts) without
    drawing fresh random numbers for tens of GB."""

    CHUNK = 1 << 22

    def __init__(self, seed: int = 0, std: float = 0.02):
        import torch
        self.gen = torch.Generator().manual_seed(seed)
        self.std = std
        self.pools: dict[tuple[str, Any], Any] = {}

    def pool(self, device: Any, dtype: Any) -> Any:
        import torch
        key = (str(device), dtype)
        if key not in self.pools:
            base = torch.randn(2 * self.CHUNK, generator=self.gen) * self.std
            self.pools[key] = base.to(device=device, dtype=dtype)
        return self.pools[key]

    def fill(self, t: Any, name: str) -> None:
        import torch
        flat = t.view(-1)
        if t.dim() < 2 and "norm" in name:
            flat.fill_(1.0)  # a scale of 1 (2 for norms stored as 1 + w): the signal neither dies nor explodes
            return
        pool = self.pool(t.device, t.dtype)
        for start in range(0, flat.numel(), self.CHUNK):
            n = min(self.CHUNK, flat.numel() - start)
            off = int(torch.randint(0, self.CHUNK, (1,), generator=self.gen))
            flat[start:start + n].copy_(pool[off:off + n])


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    best, where = -1, None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, where = len(prefix), dev
    return where


def build_transformers_model(model: str, progress: ProgressCallback, *, dtype: Any = None,
                             device_map: Any = None, max_memory: dict | None = None, seed: int = 0,
                             **unsupported: Any) -> Any:
    """A transformers model of the synthetic spec ``model`` with random weights.

    Built on the meta device, then each tensor is allocated once, on the device that
    accelerate's device map (``device_map="auto"`` with ``max_memory``, as ``from_pretrained``
    computes it) gives it, and filled. Offloaded tensors get accelerate's hooks exactly like a
    loaded checkpoint. Raises BackendError when the caps leave weights nowhere to go."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    quantization_config = unsupported.pop("quantization_config", None)
    if unsupported:
        raise BackendError(f"Synthetic models cannot be built with {', '.join(sorted(unsupported))}; "
                           "build the model, then convert it.")
    dtype = dtype or torch.bfloat16
    progress(Progress("Building the synthetic model's shapes"))
    cfg = hf_config(model)
    if quantization_config is not None:
        return _build_quantized(cfg, progress, dtype, device_map, max_memory, quantization_config, seed)
    with init_empty_weights(include_buffers=False):
        net = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if device_map is None:
        placement: dict[str, Any] = {"": "cpu"}
    elif isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        placement = {"": device_map}
    elif isinstance(device_map, str):
        from transformers.integrations.accelerate import _get_device_map
        placement = _get_device_map(net, device_map, max_memory, None)
    else:
        placement = dict(device_map)
    if "disk" in placement.values():
        raise BackendError("The synthetic model does not fit in gpu_memory_gb and cpu_memory_gb together; "
                           "raise them or use fewer layers.")
    params = list(net.named_parameters())
    total = sum(p.numel() * p.element_size() for _, p in params)
    filler = RandomFill(seed)
    done = 0
    for name, p in params:
        dev = _device_of(name, placement)
        dev = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        t = torch.empty(p.shape, dtype=p.dtype, device=dev)
        filler.fill(t, name)
        set_module_tensor_to_device(net, name, dev, value=t, clear_cache=False)
        done += t.numel() * t.element_size()
        progress(Progress("Filling random weights", done / 1e9, total / 1e9, "GB"))
    for name, b in list(net.named_buffers()):
        dev = _device_of(name, placement)
        dev = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        if b.device != dev:
            set_module_tensor_to_device(net, name, dev, value=b.to(dev))
    if getattr(cfg, "tie_word_embeddings", False):
        net.tie_weights()
    net.generation_config.eos_token_id = None
    if device_map is not None and set(placement.values()) - {"cpu"}:
        from transformers.integrations.accelerate import accelerate_dispatch
        accelerate_dispatch(net, None, placement, None, None, False)
        net.hf_device_map = placement
    return net


def random_state_dict(cfg: Any, dtype: Any, seed: int = 0, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Random weights for every parameter of ``cfg``'s model, as CPU tensors (a checkpoint that
    only ever lives in memory)."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        net = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    filler = RandomFill(seed)
    params = list(net.named_parameters())
    total = sum(p.numel() * p.element_size() for _, p in params)
    done = 0
    out = {}
    for name, p in params:
        t = torch.empty(p.shape, dtype=p.dtype)
        filler.fill(t, name)
        out[name] = t
        done += t.numel() * t.element_size()
        if progress is not None:
            progress(Progress("Filling random weights", done / 1e9, total / 1e9, "GB"))
    return out


def _build_quantized(cfg: Any, progress: ProgressCallback, dtype: Any, device_map: Any, max_memory: Any,
                     quantization_config: Any, seed: int) -> Any:
    """A quantized synthetic model: random weights in memory handed to ``from_pretrained`` as its
    state dict, so the quantizer (bitsandbytes, ...) and accelerate's placement run exactly as
    for a checkpoint, without one on disk."""
    import transformers

    state = random_state_dict(cfg, dtype, seed, progress)
    progress(Progress("Quantizing the synthetic model"))
    kwargs: dict[str, Any] = {"config": cfg, "state_dict": state, "dtype": dtype,
                              "quantization_config": quantization_config}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    model_class = getattr(transformers, cfg.architectures[0])  # the Auto class wants a path
    net = model_class.from_pretrained(None, **kwargs)
    del state
    net.generation_config.eos_token_id = None
    return net
