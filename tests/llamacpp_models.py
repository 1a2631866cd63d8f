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
