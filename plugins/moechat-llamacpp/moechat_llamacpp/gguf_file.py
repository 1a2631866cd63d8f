"""Reading a GGUF file without loading it: metadata and tensor sizes from the header (the ``gguf``
package memory-maps the file and reads no tensor data), and what is wrong with it, in a sentence.

Runs in the app process, so it imports nothing but ``gguf`` (numpy), and only when called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moechat.backends.api import BackendError

SUFFIX = ".gguf"
MAGIC = b"GGUF"
# Tensors of routed experts, as llama.cpp names them (what `-ot exps=CPU` / `--n-cpu-moe` keep on the CPU).
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\b")
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class GgufError(BackendError):
    """A GGUF file that cannot be used; the message names the file and what to do."""


@dataclass
class Tensor:
    name: str
    type: str      # GGML type name: F32, F16, Q4_K, Q8_0, ...
    elements: int
    bytes: int


@dataclass
class GgufFile:
    path: Path
    size: int
    meta: dict[str, Any]            # scalar metadata (arrays such as the vocabulary left out)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.meta.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.architecture}.{key}", default)

    @property
    def layers(self) -> int:
        return int(self.arch_key("block_count") or 0)

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary: the architecture's key where the file has one (llama.cpp's
        converter writes it for few models), else the rows of the token embeddings."""
        given = self.arch_key("vocab_size")
        if given:
            return int(given)
        width = self.arch_key("embedding_length") or 0
        embd = next((t for t in self.tensors if t.name == "token_embd.weight"), None)
        return embd.elements // width if embd and width else 0

    @property
    def quantization(self) -> str:
        """The file type llama.cpp's quantizer wrote (Q4_K_M, Q8_0, F16, ...), else the type of
        most weight bytes."""
        from gguf import LlamaFileType

        ftype = self.meta.get("general.file_type")
        if isinstance(ftype, int):
            try:
                return LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except ValueError:
                pass
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.type] = by_type.get(t.type, 0) + t.bytes
        return max(by_type, key=by_type.get) if by_type else "unknown"

    @property
    def weight_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def attention_layers(self) -> int:
        """Blocks with a KV cache: those holding attention keys (hybrid models such as Qwen3-Next
        have attention in only some of their blocks)."""
        return len({m.group(1) for t in self.tensors
                    if (m := BLOCK_TENSOR.match(t.name)) and ".attn_k" in t.name})

    def kv_bytes_per_token(self, kv_type: str) -> int:
        """KV cache bytes per token of context, over every attention block."""
        heads = self.arch_key("attention.head_count") or 1
        kv_heads = self.arch_key("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts: the largest is a safe bound
            kv_heads = max(kv_heads)
        if isinstance(heads, list):
            heads = max(heads)
        width = self.arch_key("embedding_length") or 0
        key = self.arch_key("attention.key_length") or (width // heads if heads else 0)
        value = self.arch_key("attention.value_length") or key
        return int(self.attention_layers * kv_heads * (key + value) * KV_TYPE_BYTES[kv_type])


KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one GGUF in a folder (the first part
    of a split GGUF). None when ``path`` is neither: a folder without GGUF files, a Hugging Face
    folder (config.json), or a file that is not named .gguf and does not start like one."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() == SUFFIX:
            return path
        try:
            with path.open("rb") as f:
                return path if f.read(4) == MAGIC else None
        except OSError:
            return None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) <= 1:
        return found[0] if found else None
    firsts = [p for p in found if (m := SPLIT_NAME.search(p.name)) and m.group(1) == "00001"]
    if len(firsts) == 1 and all(SPLIT_NAME.search(p.name) for p in found):
        return firsts[0]
    raise GgufError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}"
                    f"{', ...' if len(found) > 4 else ''}); pick one of them as the model.")


def read(path: str | Path) -> GgufFile:
    """Read the header of the GGUF file at ``path``, or raise GgufError with a sentence."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GgufError(f"The GGUF file {path} does not exist.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        what = "is empty" if size == 0 else "does not start with the bytes GGUF"
        raise GgufError(f"{path.name} is not a GGUF file (it {what}). llama.cpp runs .gguf files: convert "
                        "a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py, or pick another backend.")
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError) as exc:
        raise GgufError(f"{path.name} is truncated or damaged: reading it failed ({exc}). "
                        "Copy or download it again.") from None
    meta: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if not fld.types or name.startswith("GGUF."):
            continue
        if fld.types[0] == GGUFValueType.ARRAY:
            if len(fld.data) <= 64 and len(fld.types) > 1 and fld.types[1] != GGUFValueType.STRING:
                meta[name] = [v.item() if isinstance(v, np.generic) else v for v in fld.contents()]
            continue
        value = fld.contents()
        meta[name] = value.item() if isinstance(value, np.generic) else value
    tensors = []
    end = reader.data_offset
    for t in reader.tensors:
        tensors.append(Tensor(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)))
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    if end > size:
        raise GgufError(f"{path.name} is truncated or damaged: its tensors need {end:,} bytes but the file has "
                        f"{size:,}. Copy or download it again.")
    if not meta.get("general.architecture"):
        raise GgufError(f"{path.name} does not say which architecture it is (no general.architecture); "
                        "it was not written by llama.cpp's converter. Convert the model again.")
    return GgufFile(path, size, meta, tensors)


def model_info(path: str | Path) -> Any:
    """A ``ModelInfo`` (what ``moechat inspect`` prints and ``plan`` gets) for a GGUF file, or None
    when ``path`` is not one (see ``find_gguf``)."""
    from moechat.backends.modelinfo import ModelInfo

    file = find_gguf(path)
    if file is None:
        return None
    g = read(file)
    return ModelInfo(
        path=str(file.resolve()),
        model_type=g.architecture,
        architecture=g.architecture,
        param_count=sum(t.elements for t in g.tensors),
        weight_bytes=g.weight_bytes,
        dtype="gguf",
        quantization=g.quantization,
        quantization_config=None,
        num_layers=g.layers or None,
        num_experts=g.arch_key("expert_count"),
        experts_per_token=g.arch_key("expert_used_count"),
        context_length=g.arch_key("context_length"),
        shards=[file.name],
        config={"format": "gguf", "name": g.meta.get("general.name", "")},
    )
