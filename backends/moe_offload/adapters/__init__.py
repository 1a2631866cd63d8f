"""One adapter per MoE family: what in a checkpoint is a routed expert, and how to build the rest.

The engine (store, cache, dispatch, generation) knows nothing about a family. Adding a family
means one module here with an ``Adapter`` subclass listed in ``adapters()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ExpertShapes:
    moe_layers: tuple[int, ...]   # checkpoint layer indices that have routed experts
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int


class Adapter:
    """Base adapter for models whose routed experts are stored per expert as
    ``<prefix>.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.<suffix>`` and whose transformers
    implementation has a fused ``*Experts`` module called as ``experts(x, top_k_index, top_k_weights)``."""

    model_types: tuple[str, ...] = ()
    expert_re = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(\w+)$")
    skip_re: re.Pattern | None = None

    def parse_expert(self, name: str) -> tuple[int, int, str, str] | None:
        """(layer, expert, proj, suffix) for a routed-expert tensor, else None."""
        m = self.expert_re.match(name)
        if not m:
            return None
        return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)

    def skip(self, name: str) -> bool:
        """Tensors the model does not use (e.g. multi-token-prediction heads)."""
        return bool(self.skip_re and self.skip_re.match(name))

    # The transformers classes of the family: "module:Class" under transformers.models.
    causal_lm: str = ""
    rotary_embedding: str = ""

    def shapes(self, config: Any) -> ExpertShapes:
        """Which layers have routed experts (Qwen-style ``mlp_only_layers`` and
        ``decoder_sparse_step``), and the expert shapes."""
        layers = tuple(
            i for i in range(config.num_hidden_layers)
            if i not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (i + 1) % getattr(config, "decoder_sparse_step", 1) == 0
        )
        return ExpertShapes(layers, config.num_experts, config.num_experts_per_tok,
                            config.hidden_size, config.moe_intermediate_size)

    def build_resident(self, config: Any, make_experts: Callable[[int], Any]) -> Any:
        """The model on the meta device with every routed-experts module replaced by
        ``make_experts(layer_index)``."""
        import torch

        with torch.device("meta"):
            model = _transformers_class(self.causal_lm)(config)
        for i in self.shapes(config).moe_layers:
            model.model.layers[i].mlp.experts = make_experts(i)
        return model

    def rebuild_buffers(self, model: Any, device: Any) -> None:
        """Buffers that are computed, not loaded (rotary frequencies), made on ``device``."""
        import torch

        with torch.device(device):
            model.model.rotary_emb = _transformers_class(self.rotary_embedding)(model.config)

    decoder: str = ""   # "module:Class" under moechat.backends.moe_offload: the family's static decode step

    def decoder_class(self) -> Any:
        """The static decode step (``decode.py``), or None: decode through transformers' modules."""
        if not self.decoder:
            return None
        import importlib

        module, _, name = self.decoder.partition(":")
        return getattr(importlib.import_module(f"moechat.backends.moe_offload.{module}"), name)


def _transformers_class(path: str) -> Any:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def adapters() -> tuple[type[Adapter], ...]:
    """Every family's adapter class (their modules import no torch)."""
    from moechat.backends.moe_offload.adapters.qwen3_moe import Qwen3MoeAdapter
    from moechat.backends.moe_offload.adapters.qwen3_next import Qwen3NextAdapter

    return (Qwen3NextAdapter, Qwen3MoeAdapter)


def model_types() -> set[str]:
    """The model types moe-offload runs."""
    return {t for cls in adapters() for t in cls.model_types}


def adapter_for(model_type: str) -> Adapter:
    for cls in adapters():
        if model_type in cls.model_types:
            return cls()
    from moechat.backends.api import BackendError
    raise BackendError(f"moe-offload does not know the model type {model_type!r} yet; it runs "
                       f"{' and '.join(sorted(model_types()))} models. Pick another backend for this model.")
