"""The tiny GGUF the llama.cpp tests run: a tiny random Llama (moechat's tiny-model builder) written
as GGUF by the plugin's converter, with the gguf package only.

Llama, not Qwen3-Next: llama.cpp's Qwen3-Next GGUF layout (Gated DeltaNet and expert tensors,
their names, shapes and metadata) is only written by llama.cpp's convert_hf_to_gguf.py, which is
not shipped in an installable package; a hand-written copy of that layout would test our copy,
not llama.cpp. The plugin's code paths (reading, planning, loading, streaming, Stop) are the same
for every architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

# Long enough that a reply can run for many seconds (the browser test stops one mid-stream).
CONTEXT = 32768


def tiny_gguf(folder: Path, qtype: str = "Q8_0", seed: int = 1, **sizes: int) -> Path:
    """``folder``/tiny-llama-<qtype>.gguf, built from random weights, in which a reply never ends by
    itself at a random end-of-turn token, so tests decide when it stops (max_new_tokens, Stop).

    How: hidden dimension 0 of the residual stream is 1 for every token and no layer writes to
    it, so after the final norm it is always positive; the output rows of the special tokens read
    only that dimension, with weight -1000. Their logits are then far below every other token's.
    ``sizes`` override the tiny config (hidden_size=512, ...) for a model that writes slower."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from moechat.backends.demo import SPECIAL_TOKENS, build_tiny_model
    from moechat_llamacpp.convert import convert

    hf = build_tiny_model(folder / "hf-tiny-llama", "llama", seed=seed, max_position_embeddings=CONTEXT, **sizes)
    weights_file = hf / "model.safetensors"
    w = {k: v.astype(np.float32) for k, v in load_file(weights_file).items()}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    # ... and so are the rows of every token that is not plain words: replies are words, cheap to
    # show while they stream (random bytes make the page's Markdown slow)
    muted = sorted(i for i in range(tok.get_vocab_size())
                   if i in special or not re.fullmatch(r" ?[A-Za-z]+", tok.decode([i])))
    w["model.embed_tokens.weight"][:, 0] = 1.0
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[name][0, :] = 0.0
    w["model.norm.weight"][0] = 1.0
    head = w["lm_head.weight"]
    head[:, 0] = 0.0
    head[muted, :] = 0.0
    head[muted, 0] = -1000.0
    save_file(w, weights_file, metadata={"format": "pt"})
    return convert(hf, folder / f"tiny-llama-{qtype.lower()}.gguf", qtype)


# Qwen's vocabulary (Qwen2 to Qwen3-Next): 151,936 tokens, 151,387 merges.
QWEN_VOCAB, QWEN_MERGES = 151_936, 151_387


def qwen_vocab_gguf(path: Path) -> Path:
    """A GGUF at ``path`` with the header of a Qwen model: its vocabulary (151,936 token strings,
    their types, 151,387 merges), Qwen3-Next metadata (a per-layer array, a float, a bool, a
    chat template), a 64-byte alignment, and tiny tensors of several types (F32, F16, Q8_0,
    Q4_K). Its header is what makes reading a real Qwen GGUF slow; the tensors are a few KB."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType

    w = GGUFWriter(path, "qwen3next")
    w.add_custom_alignment(64)
    w.add_name("qwen-vocab")
    w.add_block_count(2)
    w.add_context_length(262144)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv([0, 2])           # a small array: kept
    w.add_layer_norm_rms_eps(1e-6)        # a float32
    w.add_expert_count(8)
    w.add_expert_used_count(2)
    w.add_bool("qwen3next.test_flag", True)
    w.add_array("qwen3next.test_long", list(range(65)))   # over 64 items: left out
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    tokens = [f"Ġword{i}" if i % 3 else f"é{i}ü" for i in range(QWEN_VOCAB - 22)]
    tokens += [f"<|special_{i}|>" for i in range(22)]
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * (QWEN_VOCAB - 22) + [TokenType.CONTROL] * 22)
    w.add_token_merges([f"Ġw ord{i}" for i in range(QWEN_MERGES)])
    w.add_eos_token_id(QWEN_VOCAB - 1)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    for kind, name in ((GGMLQuantizationType.Q8_0, "blk.1.attn_k.weight"),
                       (GGMLQuantizationType.Q4_K, "blk.1.ffn_gate_exps.weight")):
        block, type_size = GGML_QUANT_SIZES[kind]
        rows, cols = 8, 256
        raw = rng.integers(0, 255, (rows, cols // block * type_size), dtype=np.uint8)
        w.add_tensor(name, raw, raw_dtype=kind)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
