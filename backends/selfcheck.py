"""The output self-check: is the loaded model producing language or garbage?

A working language model finds a plain English paragraph easy to predict: its perplexity on it
is low (a few units for a real model). A broken one (wrong weights, a bad kernel, an offload
that mixed up layers) predicts no better than chance, which scores near the vocabulary size or
worse. The check scores one fixed paragraph with ``Backend.perplexity`` and compares.

It works for every backend that implements ``perplexity`` (every transformers-based backend and
the vLLM backends do); for one that does not, the result says the output was not checked.

    from moechat.backends import selfcheck
    result = selfcheck.check_loaded(manager)        # in the app, on the loaded backend
    result = selfcheck.check_backend(backend, folder)  # inside a worker, e.g. right after load

Nothing here imports anything heavy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moechat.backends.demo import CORPUS

# The English prose at the start of the demo corpus: the tiny demo models learn it, and any
# real model finds it easy.
PARAGRAPH = CORPUS.split("Write a short poem")[0].replace("\n", " ").strip()

# A working model must score under this, whatever its vocabulary (real models score 2 to 30
# on PARAGRAPH); a small vocabulary lowers the bar to its square root, halfway (in bits per
# token) between knowing the text by heart and guessing at random.
MAX_PERPLEXITY = 100.0


@dataclass
class SelfCheck:
    """The verdict. ``passed`` is None when the backend could not be checked."""

    passed: bool | None
    perplexity: float | None
    limit: float
    vocab_size: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def wrong_output(self) -> bool:
        return self.passed is False


def limit_for(vocab_size: int | None) -> float:
    """The highest perplexity a working model may score on PARAGRAPH."""
    if not vocab_size or vocab_size < 4:
        return MAX_PERPLEXITY
    return min(MAX_PERPLEXITY, math.sqrt(vocab_size))


def judge(perplexity: float, vocab_size: int | None) -> SelfCheck:
    """Turn a perplexity on PARAGRAPH into a verdict with a sentence for the person."""
    limit = limit_for(vocab_size)
    chance = f"; guessing at random scores about {vocab_size}" if vocab_size else ""
    if math.isfinite(perplexity) and perplexity <= limit:
        return SelfCheck(True, perplexity, limit, vocab_size,
                         f"Output self-check passed: perplexity {perplexity:.3g} on a fixed English "
                         f"paragraph (a working model scores under {limit:.3g}{chance}).")
    shown = f"{perplexity:.3g}" if math.isfinite(perplexity) else "not a number"
    return SelfCheck(False, perplexity if math.isfinite(perplexity) else None, limit, vocab_size,
                     f"This model is producing wrong output: its perplexity on a fixed English "
                     f"paragraph is {shown} (a working model scores under {limit:.3g}{chance}). "
                     "Do not trust its replies; load it without weight offload or with other "
                     "settings, or check the model files.")


def run(score: Callable[[str], float], vocab_size: int | None, text: str = PARAGRAPH) -> SelfCheck:
    """Score ``text`` with ``score`` (a perplexity function) and judge the result."""
    limit = limit_for(vocab_size)
    try:
        value = score(text)
    except NotImplementedError:
        return SelfCheck(None, None, limit, vocab_size,
                         "This backend cannot score text, so its output was not self-checked.")
    except Exception as exc:  # a check that cannot run must say so, not take the load down
        return SelfCheck(None, None, limit, vocab_size,
                         f"The output self-check could not run: {exc}")
    return judge(float(value), vocab_size)


def vocab_size_of(folder: str | Path) -> int | None:
    """The vocabulary size in a model folder's config.json (top level or text_config)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config_vocab_size(config)


def config_vocab_size(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        value = cfg.get("vocab_size")
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_backend(backend: Any, model_folder: str | Path) -> SelfCheck:
    """Run the check on a loaded backend instance (inside its worker process)."""
    return run(backend.perplexity, vocab_size_of(model_folder))


def check_loaded(manager: Any) -> SelfCheck:
    """Run the check on the backend a ``BackendManager`` has loaded."""
    model = manager.state.model
    vocab = config_vocab_size(model.config) if model is not None else None
    return run(manager.perplexity, vocab)
