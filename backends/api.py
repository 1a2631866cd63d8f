"""The public plugin API: what a backend is and what flows in and out of it.

A backend is a class that a plugin hands to the app through the ``register_backends`` hook.
The app (in its own process) only reads the class attributes and calls ``probe`` and ``plan``,
which must be cheap and must not import torch, transformers, vllm or bitsandbytes.
``load``, ``generate``, ``stats`` and ``unload`` run on an instance inside a worker process.

Nothing here imports anything heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

FinishReason = Literal["stop", "length", "cancelled", "error"]


class BackendError(Exception):
    """An error a person can act on. Its message is shown as it is, on the page and in the CLI.
    ``code`` travels with it to the app (the API answers with it)."""

    code: ClassVar[str] = "backend_error"


class PromptTooLong(BackendError):
    """The prompt does not fit the model's context. The host raises it itself when the backend
    answers ``count_prompt_tokens`` and ``context_length``; a backend that cannot count cheaply
    raises it from ``generate`` before generating."""

    code: ClassVar[str] = "context_length_exceeded"


class SettingsInvalid(BackendError):
    """Load settings that cannot be used. The host raises it for settings that fail validation;
    a backend's ``check`` may raise it (or any BackendError) to refuse a combination."""

    code: ClassVar[str] = "invalid_settings"


class BackendUnavailable(BackendError):
    """The backend cannot run here (its probe said why)."""

    code: ClassVar[str] = "backend_unavailable"


class PlanDoesNotFit(BackendError):
    """The memory plan says the load would not fit; loading anyway needs ``force``."""

    code: ClassVar[str] = "does_not_fit"


class Cancelled(BackendError):
    """A load (or a queued request) was cancelled by the person."""

    code: ClassVar[str] = "cancelled"


def error_of(code: str | None, message: str) -> BackendError:
    """The BackendError subclass with ``code`` (an error that crossed the worker connection as a
    code comes back as its type); plain BackendError for codes of no known subclass."""
    todo: list[type[BackendError]] = [BackendError]
    while todo:
        cls = todo.pop()
        if cls.code == code:
            return cls(message)
        todo.extend(cls.__subclasses__())
    return BackendError(message)


class BackendSettings(BaseModel):
    """Base class of a backend's load settings. The web form is generated from the fields:
    their type, default, ``Field(description=...)`` (shown as help) and ``ge``/``le`` bounds."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="Model folder: a Hugging Face-style folder with config.json, "
                                       "tokenizer and safetensors weights. Empty: the built-in demo model.")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose probability adds up to this.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    max_new_tokens: int = Field(512, ge=1, le=262144, description="Most tokens to generate.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=5.0, description="Above 1 discourages repeating tokens.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Fix the random seed for repeatable sampling.")
    stop: list[str] = Field(default_factory=list, description="Stop generating when one of these strings appears.")


class GenerateRequest(BaseModel):
    """One chat turn to complete. ``prompt`` (raw text) is used instead of ``messages`` when set."""

    messages: list[Message] = Field(default_factory=list)
    prompt: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    continue_last: bool = Field(False, description="Continue the last assistant message instead of starting a new one.")


@dataclass
class Chunk:
    """One piece of a streamed reply. The last chunk of a stream has ``finish_reason`` set.

    ``tokens`` is how many generated tokens this chunk's text stands for; ``prompt_tokens`` is
    set on the first chunk (or the last) so the host can compute prefill speed and usage."""

    text: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass
class Probe:
    """Whether a backend can run here. ``reason`` says why not, and what to do about it."""

    available: bool
    reason: str = ""


@dataclass
class Progress:
    """Load progress: ``stage`` in words, ``done`` out of ``total`` (in ``unit``), when known."""

    stage: str
    done: float = 0.0
    total: float | None = None
    unit: str = ""


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]


@dataclass
class MemoryItem:
    what: str
    device: Literal["gpu", "host"]
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """What a load will need, before it starts. ``advice`` names the setting to change when
    ``fits`` is false."""

    items: list[MemoryItem] = field(default_factory=list)
    gpu_available: int | None = None
    host_available: int | None = None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Numbers the load's info must report as planned (e.g. ``cache_slots_per_layer``); the
    # manager compares them after loading.
    expect: dict[str, int] = field(default_factory=dict)

    @property
    def gpu_bytes(self) -> int:
        return sum(i.bytes for i in self.items if i.device == "gpu")

    @property
    def host_bytes(self) -> int:
        return sum(i.bytes for i in self.items if i.device == "host")

    @property
    def fits(self) -> bool:
        gpu_ok = self.gpu_available is None or self.gpu_bytes <= self.gpu_available
        host_ok = self.host_available is None or self.host_bytes <= self.host_available
        return gpu_ok and host_ok


# The two marks a setting can carry (docs/plugin-hooks.md, "Secret and operator-only settings"):
# a field typed ``SecretStr`` is write-only (never sent back to a browser, logged or echoed), and a
# field with ``json_schema_extra={"operator_only": True}`` is set only by the operator (CLI/env),
# never from the page or the API. These two functions are the only readers of the marks.
OPERATOR_ONLY = "operator_only"


def secret_fields(settings_cls: type[BaseModel]) -> set[str]:
    """The names of ``settings_cls``'s fields typed ``SecretStr`` (optional or not)."""
    import typing

    return {name for name, info in settings_cls.model_fields.items()
            if info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation)}


def operator_only_fields(settings_cls: type[BaseModel]) -> set[str]:
    """The names of ``settings_cls``'s fields marked ``json_schema_extra={"operator_only": True}``."""
    return {name for name, info in settings_cls.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(OPERATOR_ONLY)}


def probe_modules(*modules: str) -> Probe:
    """A probe for backends that need only some Python packages: available when all of them can be
    imported, else a reason naming the missing ones. Imports nothing."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        return Probe(False, f"{', '.join(missing)} not installed: run `make install`.")
    return Probe(True)


class Backend:
    """Subclass this and hand the class to ``register(...)`` in your ``register_backends`` hook.

    Class attributes are read by the app without loading anything. One instance lives in one
    worker process and owns the loaded model there.
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Settings: ClassVar[type[BackendSettings]] = BackendSettings
    # False for backends that run no local model folder (a remote server, a fake): the app then
    # neither checks nor creates a model folder, and ``plan`` gets ``model=None``.
    needs_model: ClassVar[bool] = True
    # True when the backend's GPU memory in its worker goes through torch's allocator: a VRAM
    # budget (``moechat bench --vram-budget-gb``) is then enforced there by torch's per-process cap.
    # False for an engine with its own allocator or its own process (llama.cpp, vLLM): the budget
    # reaches it only through the settings derived from it, and its worker never initializes
    # torch's CUDA (the cap would not hold it, the context costs GPU memory, and next to
    # llama.cpp's CUDA build a torch CUDA context crashed the worker).
    torch_gpu_memory: ClassVar[bool] = True

    # ---- cheap, called in the app process --------------------------------------------
    @classmethod
    def check(cls, settings: BackendSettings, model: Any) -> None:
        """Refuse settings that validate one by one but cannot be used together (or with this
        ``model``, a ``ModelInfo``, None when ``needs_model`` is False): raise ``BackendError``
        (or ``SettingsInvalid``) with a sentence that names the setting to change. Called before
        the model that is loaded now is unloaded, so a refused setting keeps it. Cheap: no heavy
        imports, no loading. Single-field rules belong in the ``Settings`` model (``Field`` bounds
        or a pydantic validator), which the host checks first."""

    @classmethod
    def probe(cls, settings: BackendSettings | None = None) -> Probe:
        """Say whether this backend can run here. Must be fast and import nothing heavy
        (use ``importlib.util.find_spec``). Listing calls it without settings; a load calls it
        with the settings about to be used (another interpreter, say), so judge those."""
        return Probe(True)

    @classmethod
    def worker_python(cls, settings: BackendSettings) -> str | None:
        """The Python interpreter that runs this backend's worker; None for the app's own."""
        return None

    @classmethod
    def plan(cls, model: Any, settings: BackendSettings, machine: Any) -> MemoryPlan | None:
        """Memory needed to load ``model`` (a ``ModelInfo``) with ``settings`` on ``machine``
        (a ``Machine``). None when this backend cannot say."""
        return None

    # ---- called in the worker process --------------------------------------------------
    def load(self, settings: BackendSettings, progress: ProgressCallback) -> dict[str, Any]:
        """Load the model. Report progress through ``progress``. Raise ``BackendError`` with a
        sentence for anything the person can fix. Returns facts about what was loaded
        (at least ``model_name``)."""
        raise NotImplementedError

    def generate(self, request: GenerateRequest, should_stop: StopCheck) -> Iterator[Chunk]:
        """Stream the reply. Check ``should_stop()`` between tokens and end with
        ``finish_reason="cancelled"`` when it is true. The last chunk has a finish reason."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Backend-specific numbers (cache hit rate, bytes moved, ...). The host adds timing,
        token counts and memory; keys here are shown as they are."""
        return {}

    def context_length(self) -> int | None:
        """Most tokens (prompt + reply) the loaded model takes, if known."""
        return None

    def count_prompt_tokens(self, request: GenerateRequest) -> int | None:
        """Tokens the prompt of ``request`` takes, if the backend can tell cheaply."""
        return None

    def perplexity(self, text: str) -> float:
        """Perplexity of the loaded model on ``text`` (raw text, no chat template): the exp of
        the mean negative log-likelihood of each token given the ones before it. Optional;
        ``moechat.backends.selfcheck`` uses it to tell a working model (low) from one that produces
        garbage (near the vocabulary size or above). Raise NotImplementedError when the
        backend cannot score text."""
        raise NotImplementedError

    def unload(self) -> None:
        """Free what can be freed. The worker process ends right after this anyway."""
