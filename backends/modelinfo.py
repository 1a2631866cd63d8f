"""Reading a model folder without loading it: config, quantization, size, and what is wrong.

Everything here reads JSON and safetensors headers only; nothing imports torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moechat.backends.api import BackendError

# model_type values whose architecture moechat's backends know how to run.
KNOWN_MODEL_TYPES = {
    "qwen3_next", "qwen3_moe", "qwen3", "qwen2", "qwen2_moe", "llama", "mistral", "mixtral",
    "deepseek_v3", "deepseek_v2", "gpt_oss", "olmoe", "granitemoe", "phi3", "gemma3", "gemma2",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class ModelFolderError(BackendError):
    """A folder that is not a usable model; the message names the file and the problem."""


@dataclass
class ModelInfo:
    path: str
    model_type: str
    architecture: str
    param_count: int
    weight_bytes: int
    dtype: str
    quantization: str | None
    quantization_config: dict[str, Any] | None
    num_layers: int | None
    num_experts: int | None
    experts_per_token: int | None
    context_length: int | None
    shards: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        quant = self.quantization or self.dtype
        moe = f", {self.num_experts} experts ({self.experts_per_token} per token)" if self.num_experts else ""
        return (f"{self.architecture} ({self.model_type}), {self.param_count / 1e9:.2f} B parameters, "
                f"{quant}{moe}, {self.num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        d["summary"] = self.summary()
        return d


def quantization_method(qcfg: dict[str, Any] | None) -> str | None:
    """A short name for a quantization_config: block-fp8, compressed-tensors-fp8, bitsandbytes-4bit, ..."""
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "fp8":
        return "block-fp8" if qcfg.get("weight_block_size") else "fp8"
    if method == "compressed-tensors":
        groups = qcfg.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        if any(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
            return "compressed-tensors-fp8"
        if any(w.get("type") == "int" and w.get("num_bits") == 4 for w in weights):
            return "compressed-tensors-int4"
        return "compressed-tensors"
    if method == "bitsandbytes":
        return "bitsandbytes-4bit" if qcfg.get("load_in_4bit") else "bitsandbytes-8bit"
    if method in ("gptq", "awq"):
        return f"{method}-{qcfg.get('bits', 4)}bit"
    return method or None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFolderError(f"{path.name} is empty or truncated ({size} bytes): copy it again.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelFolderError(f"{path.name} is truncated: its header says {n} bytes but the file has {size}. Copy it again.")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ModelFolderError(f"{path.name} is not a valid safetensors file ({exc}).") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFolderError(
            f"{path.name} is truncated: it needs {8 + n + end} bytes but has {size}. Copy it again.")
    return header


def inspect(folder: str | Path, *, weights: bool = True) -> ModelInfo:
    """Read ``folder`` as a model, or raise ModelFolderError with one sentence naming the problem.

    ``weights=False`` (for a memory plan): the folder may hold only config.json, and the index
    file if present, so a person can ask "will it fit" before downloading the weights; the sizes
    then come from the config's shapes (and the index's total size), see ``config_only``."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelFolderError(f"The model folder {path} does not exist.")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is a file; give the folder that holds config.json.")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelFolderError(f"{path} has no config.json, so it is not a Hugging Face-style model folder.")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{cfg_path} is not valid JSON ({exc}).") from exc
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    if model_type not in KNOWN_MODEL_TYPES:
        raise ModelFolderError(
            f"{cfg_path.name} says model_type {model_type!r}, an architecture moechat's backends do not "
            f"know. Known: {', '.join(sorted(KNOWN_MODEL_TYPES))}.")
    if not weights and not _has_all_weights(path):
        return config_only(path, config)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
            "from the model's release into the folder.")

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelFolderError(f"{index_path.name} is not a valid safetensors index ({exc}).") from exc
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).exists():
                raise ModelFolderError(
                    f"{shard} is missing: {index_path.name} lists it but the folder does not have it.")
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise ModelFolderError(f"{path} has no .safetensors weights.")

    params = 0
    weight_bytes = 0
    dtypes: dict[str, int] = {}
    for shard in shards:
        header = read_safetensors_header(path / shard)
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            params += n
            nbytes = t["data_offsets"][1] - t["data_offsets"][0]
            weight_bytes += nbytes
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + nbytes
    qcfg = config.get("quantization_config") or config.get("compression_config")
    text = config.get("text_config") or config
    return ModelInfo(
        path=str(path),
        model_type=model_type,
        architecture=archs[0] if archs else model_type,
        param_count=params,
        weight_bytes=weight_bytes,
        dtype=max(dtypes, key=dtypes.get) if dtypes else str(config.get("torch_dtype", "")),
        quantization=quantization_method(qcfg),
        quantization_config=qcfg,
        num_layers=text.get("num_hidden_layers"),
        num_experts=text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts"),
        experts_per_token=text.get("num_experts_per_tok"),
        context_length=text.get("max_position_embeddings"),
        shards=shards,
        config=config,
    )


INDEX_FILE = "model.safetensors.index.json"


def _has_all_weights(path: Path) -> bool:
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return True   # let inspect() name the broken index
        return bool(shards) and all((path / shard).exists() for shard in shards)
    return any(path.glob("*.safetensors"))


def config_only(path: Path, config: dict[str, Any]) -> ModelInfo:
    """The ModelInfo of a folder that has config.json but not (all) its weights: parameter
    counts from the config's shapes; the weights' size from the index's ``total_size`` when
    there is an index (right for quantized checkpoints too), else the parameters in the config's
    dtype."""
    from moechat.backends.shapes import model_from_config

    try:
        info = model_from_config(config, path=str(path))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelFolderError(
            f"{path} has no weights, and its config.json lacks {exc} to size the model from; a memory "
            "plan needs the weights or a complete config.json.") from exc
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            total = json.loads(index_path.read_text()).get("metadata", {}).get("total_size")
        except ValueError as exc:
            raise ModelFolderError(f"{index_path.name} is not a valid safetensors index ({exc}).") from exc
        if isinstance(total, int) and total > 0:
            info.weight_bytes = total
    return info

