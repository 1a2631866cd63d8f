"""The tiny GGUF the llama.cpp tests run: a tiny random Llama (moechat's tiny-model builder) written
as GGUF by the plugin's converter, with the gguf package only.

Llama, not Qwen3-Next: llama.cpp's Qwen3-Next GGUF layout (Gated DeltaNet and expert tensors,
their names, shapes and metadata) is only written by llama.cpp's convert_hf_to_gguf.py, which is
not shipped in an installable package; a hand-written copy of that layout would test our copy,
not llama.cpp. The plugin's code paths (reading, planning, loading, streaming, Stop) are the same
for every architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

# Long enough that a reply can run for many seconds (the browser test stops one mid-stream).
CONTEXT = 32768


def tiny_gguf(folder: Path, qtype: str = "Q8_0", seed: int = 1) -> Path:
    """``folder``/tiny-llama-<qtype>.gguf, built from random weights. The output rows of the
    special tokens are zeroed and the rest scaled up, so a reply never ends by itself at a random
    end-of-turn token: tests decide when a reply stops (max_new_tokens, Stop)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from moechat.backends.demo import SPECIAL_TOKENS, build_tiny_model
    from moechat_llamacpp.convert import convert

    hf = build_tiny_model(folder / "hf-tiny-llama", "llama", seed=seed, max_position_embeddings=CONTEXT)
    weights_file = hf / "model.safetensors"
    weights = load_file(weights_file)
    vocab = json.loads((hf / "tokenizer.json").read_text())
    special = [t["id"] for t in vocab["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    head = weights["lm_head.weight"].astype(np.float32) * 10.0
    head[special] = 0.0
    weights["lm_head.weight"] = head
    save_file(weights, weights_file, metadata={"format": "pt"})
    return convert(hf, folder / f"tiny-llama-{qtype.lower()}.gguf", qtype)
