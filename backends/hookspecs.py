"""The hooks a moechat plugin can implement. Each is documented in docs/plugin-hooks.md.

pluggy finds backends and carries events; it does not dispatch generation. Generation is an
ordinary method call on the one chosen backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from moechat.backends.api import Backend
    from moechat.backends.modelinfo import ModelInfo

PROJECT = "moechat"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Hand backend classes to the app: call ``register(MyBackend)`` once per backend.

    Called whenever the app lists backends. Must be cheap: no torch or model imports."""


@hookspec(firstresult=True)
def suggest_backend(model: ModelInfo) -> str | None:
    """Propose a backend name for a model folder, or None to let other plugins answer.

    The first non-None answer wins; the built-in plugin answers last."""


@hookspec(firstresult=True)
def inspect_model(path: str) -> ModelInfo | None:
    """Read a model that is not a Hugging Face folder (a single-file format such as GGUF): return
    its ``ModelInfo``, or None to let other plugins and then moechat's own reader try. Raise
    ``BackendError`` with a sentence when the file is yours but unusable. Reads headers only."""


@hookspec
def model_file_suffixes() -> list[str]:
    """File name endings (``".gguf"``) of single-file models this plugin reads; the page's model
    picker lists such files under the models folder."""


@hookspec
def moechat_event(name: str, data: dict[str, Any]) -> None:
    """Observe what the app does: ``load_started``, ``load_finished``, ``load_failed``,
    ``unloaded``, ``generation_finished``, ``worker_crashed``. ``data`` holds the backend name
    and the details of the event. Exceptions raised here are logged and ignored."""
