"""Tiny models with random weights and a locally trained tokenizer.

The demo model the app serves when no model is given, and the models the tests use, come from
here. Nothing is downloaded: the tokenizer is trained on the text below in a second or two.

    build_tiny_model(folder, family="qwen3_next", seed=0)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAMILIES = ("qwen3_next", "qwen3_moe", "llama")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text the demo tokenizer learns from (and the paragraph the self-check scores).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token to a
few of its many experts, so most of its weights sit idle for any one token. Moving only the
experts that a token needs is cheaper than moving the whole model. Hello! How are you today?
I am fine, thank you. What is the capital of France? Paris is the capital of France.
Write a short poem about the sea. The sea is wide and deep and blue, it keeps its secrets old and new.
def add(a, b):
    return a + b
print(add(2, 3))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Markdown: **bold**, *italic*, `code`, # heading, - item.
Graphics cards have fast memory but not much of it; main memory is large but slower.
"""


def train_tokenizer(folder: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE tokenizer on CORPUS and save it with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def tiny_config(family: str = "qwen3_next", vocab_size: int = 384, **overrides: Any) -> Any:
    """A transformers config of ``family`` with every width tiny but the structure intact."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    if family == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(
            **common, num_hidden_layers=4, intermediate_size=96, full_attention_interval=4,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            decoder_sparse_step=1, norm_topk_prob=True, partial_rotary_factor=0.25,
        )
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, num_hidden_layers=2, intermediate_size=96, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
        )
    elif family == "llama":
        cfg = transformers.LlamaConfig(**common, num_hidden_layers=2, intermediate_size=96)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(folder: str | os.PathLike, family: str = "qwen3_next", seed: int = 0,
                     dtype: str = "float32", **overrides: Any) -> Path:
    """Write a tiny ``family`` model (random weights, seeded) and its tokenizer into ``folder``."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(folder)
    cfg = tiny_config(family, vocab_size=len(tok), **overrides)
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    # Random init of a tiny model leaves some norms at zero: give every weight some signal so
    # different experts and layers really differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0.0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(folder)
    (folder / "moechat-demo.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return folder


def build_selfcheck_models(root: str | os.PathLike, steps: int = 100) -> tuple[Path, Path]:
    """A tiny Llama trained on the self-check paragraph (so it scores it well) and a copy of it
    with every weight tensor shuffled (so it scores it badly): the two sides of the output
    self-check, for tests and for the GPU check script."""
    import shutil

    import torch
    import transformers

    from moechat.backends.selfcheck import PARAGRAPH

    root = Path(root)
    trained = build_tiny_model(root / "trained", "llama", seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(trained)
    model = transformers.AutoModelForCausalLM.from_pretrained(trained)
    ids = torch.tensor([tok(PARAGRAPH, add_special_tokens=False)["input_ids"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, and a busy box stays fast
    try:
        torch.manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(trained)

    scrambled = root / "scrambled"
    shutil.copytree(trained, scrambled)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=g)])
    model.save_pretrained(scrambled)
    return trained, scrambled


def demo_model_dir(data_dir: Path) -> Path:
    """The demo model in ``data_dir``, created on first use."""
    folder = data_dir / "demo-model"
    if not (folder / "moechat-demo.json").exists():
        tmp = data_dir / "demo-model.partial"
        build_tiny_model(tmp, "qwen3_next", seed=0)
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        tmp.rename(folder)
    return folder


def is_demo(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "moechat-demo.json").exists()
