"""Write a small Hugging Face Llama folder (safetensors weights, a byte-level BPE ``tokenizer.json``)
as a GGUF file, with the ``gguf`` package only.

For tests and benchmarks that need a GGUF made here from local weights (no model hub): the tiny
random models moechat builds (``moechat.backends.demo.build_tiny_model(folder, "llama")``) convert
in well under a second. For real models use llama.cpp's own ``convert_hf_to_gguf.py``, which knows
every architecture; this writes the Llama architecture only, the way that script does (same
tensor names and the same permutation of the query and key rows for llama.cpp's rotary layout).

    python -m moechat_llamacpp.convert MODEL_DIR OUT.gguf [--type Q8_0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
# Hugging Face names (after ``model.``) -> GGUF names; {i} is the layer.
NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def permute(w, heads: int):
    """Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs), as convert_hf_to_gguf.py."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[0] == "layers":
        key = ".".join(["layers", "{i}", *parts[2:]])
        return NAMES[key].format(i=parts[1])
    return NAMES[name]


def convert(model_dir: str | Path, out: str | Path, qtype: str = "Q8_0") -> Path:
    """Write ``model_dir`` (a Llama folder) as the GGUF file ``out``; weights of two or more
    dimensions as ``qtype``, norms in F32."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir} is a {config.get('model_type')!r} model; this converter writes Llama only "
                         "(use llama.cpp's convert_hf_to_gguf.py for others).")
    if qtype not in TYPES:
        raise ValueError(f"type {qtype!r} is not one of {', '.join(TYPES)}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for text, i in special.items():
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = text
    types = [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    eos = special[tok_cfg["eos_token"]]
    pad = special.get(tok_cfg.get("pad_token") or "", eos)

    w = GGUFWriter(out, "llama")
    w.add_name(model_dir.name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                               or 10000.0))
    w.add_vocab_size(len(tokens))
    w.add_file_type(getattr(LlamaFileType, "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    w.add_add_bos_token(False)
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])

    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    for hf_name, t in sorted(weights.items()):
        t = t.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif hf_name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
        kind = GGMLQuantizationType[qtype] if t.ndim >= 2 else GGMLQuantizationType.F32
        data = quants.quantize(t, kind)
        w.add_tensor(gguf_name(hf_name), data, raw_dtype=kind if kind not in (
            GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moechat_llamacpp.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--type", default="Q8_0", choices=TYPES)
    args = p.parse_args(argv)
    print(convert(args.model_dir, args.out, args.type))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
