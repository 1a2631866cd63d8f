"""Reading a GGUF file without loading it: metadata and tensor sizes from the header (read here
from a memory map; no tensor data is read), and what is wrong with it, in a sentence.

Runs in the app process, so it imports nothing but ``gguf`` (numpy, for its constants), and only
when called.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
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


# GGUF's fixed-size value types (``gguf.GGUFValueType`` names) and their struct formats; the other
# two are STRING (uint64 length, then UTF-8 bytes) and ARRAY (item type, uint64 count, items).
VALUE_FORMATS = (("UINT8", "B"), ("INT8", "b"), ("UINT16", "H"), ("INT16", "h"), ("UINT32", "I"), ("INT32", "i"),
                 ("FLOAT32", "f"), ("BOOL", "?"), ("UINT64", "Q"), ("INT64", "q"), ("FLOAT64", "d"))
GGUF_VERSIONS = (2, 3)
KEPT_ARRAY_ITEMS = 64  # arrays of numbers up to this long are kept in meta (per-layer head counts, ...)


class _Header:
    """GGUF's header (v2 and v3) parsed from ``buf``: scalar metadata, small arrays of numbers,
    tensor infos. Arrays it does not keep (the vocabulary, token types, merges) are stepped over
    without decoding their items: walking their string lengths is what keeps a Qwen header
    (151,936 tokens, 151,387 merges) fast, where ``gguf.GGUFReader`` makes an object of each."""

    def __init__(self, buf: mmap.mmap) -> None:
        from gguf import GGUFValueType

        self.buf, self.size, self.pos = buf, len(buf), 4
        self.types = GGUFValueType
        self.string, self.array, self.uint32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32
        self.formats = {GGUFValueType[name]: fmt for name, fmt in VALUE_FORMATS}
        self.order = "<"

    def need(self, n: int) -> None:
        """Raise unless ``n`` more bytes are left after the cursor."""
        if self.pos + n > self.size:
            raise ValueError(f"its header runs past the end of the file, at byte {self.pos:,} of {self.size:,}")

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(self.order + fmt)
        self.need(s.size)
        values = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return values

    def text(self) -> str:
        (n,) = self.unpack("Q")
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def value_type(self) -> Any:
        (raw,) = self.unpack("I")
        try:
            return self.types(raw)
        except ValueError:
            raise ValueError(f"a value has the unknown type {raw}") from None

    def value(self, vtype: Any) -> Any:
        """The value of type ``vtype`` at the cursor; None for an array that is not kept."""
        if vtype == self.string:
            return self.text()
        if vtype != self.array:
            return self.unpack(self.formats[vtype])[0]
        itype = self.value_type()
        (count,) = self.unpack("Q")
        if itype in self.formats:
            fmt = self.formats[itype]
            if 0 < count <= KEPT_ARRAY_ITEMS:
                return list(self.unpack(f"{count}{fmt}"))
            self.need(count * struct.calcsize(fmt))
            self.pos += count * struct.calcsize(fmt)
        elif itype == self.string:
            self.need(count * 8)  # each string is at least its length
            length = struct.Struct(self.order + "Q").unpack_from
            pos, size = self.pos, self.size
            try:
                for _ in range(count):
                    pos += 8 + length(self.buf, pos)[0]
            except struct.error:  # a length that starts past the end
                self.need(size + 1)
            self.need(pos - self.pos)
            self.pos = pos
        else:  # arrays of arrays: none of them is kept
            self.need(count * 12)  # each is at least its item type and count
            for _ in range(count):
                self.value(itype)
        return None

    def read(self) -> tuple[dict[str, Any], list[Tensor], int]:
        """The metadata, the tensors and the byte where the last tensor's data ends."""
        from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

        (version,) = self.unpack("I")
        if version & 0xFFFF == 0:  # written for the other byte order
            self.order = ">"
            version = struct.unpack("<I", struct.pack(">I", version))[0]
        if version not in GGUF_VERSIONS:
            raise ValueError(f"it is GGUF version {version}; this reads versions 2 and 3")
        tensor_count, kv_count = self.unpack("QQ")
        meta: dict[str, Any] = {}
        seen = set()
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = self.text()
            if key in seen:
                raise ValueError(f"the key {key} appears twice")
            seen.add(key)
            vtype = self.value_type()
            value = self.value(vtype)
            if key == "general.alignment":
                if vtype != self.uint32:
                    raise ValueError("general.alignment is not a uint32")
                if value == 0 or value & (value - 1):
                    raise ValueError(f"general.alignment is {value}, not a power of two")
                alignment = value
            if value is not None and not key.startswith("GGUF."):
                meta[key] = value
        infos = []
        for _ in range(tensor_count):
            name = self.text()
            (n_dims,) = self.unpack("I")
            dims = self.unpack(f"{n_dims}Q")
            raw_type, offset = self.unpack("IQ")
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"the tensor {name} has the unknown type {raw_type}") from None
            infos.append((name, dims, ggml_type, offset))
        data = -(-self.pos // alignment) * alignment
        tensors, names, end = [], set(), data
        for name, dims, ggml_type, offset in infos:
            if name in names:
                raise ValueError(f"the tensor {name} appears twice")
            names.add(name)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            elements = math.prod(dims)
            tensors.append(Tensor(name, ggml_type.name, elements, elements * type_size // block))
            end = max(end, data + offset + tensors[-1].bytes)
        return meta, tensors, end


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
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, tensors, end = _Header(buf).read()
    except (ValueError, KeyError, OverflowError, RecursionError, OSError) as exc:
        raise GgufError(f"{path.name} is truncated or damaged: reading it failed ({exc}). "
                        "Copy or download it again.") from None
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
