"""The host/worker protocol: every message between ``BackendManager`` (the host) and the worker
process (``moechat.backends.worker``), as typed dataclasses both ends import from here.

On the connection a message travels as a plain dict (``to_wire``: the class name under
``"type"`` plus its fields) and is rebuilt on the other side (``from_wire``), so the two ends
may run under different interpreters (vLLM's venv, say) as long as each has moechat. This module
imports only the standard library: a worker venv needs nothing more than moechat's own light
dependencies to speak it.

host -> worker::

    Load(settings)           load the backend with these (already validated) settings
    Generate(id, request)    stream a reply to ``request`` (a GenerateRequest as a dict)
    Cancel(id)               stop that generation at the next token (read at once)
    StatsRequest()           answered at once, also while a reply streams
    PerplexityRequest(text)
    Unload()                 unload and end the worker

worker -> host::

    LoadProgress(stage, done, total, unit)
    Loaded(info) / LoadFailed(message, code)
    ChunkOut(id, text, tokens)
    Done(id, finish_reason, usage, error, code)    code: the BackendError's ``code``
    StatsReply(stats)
    PerplexityReply(value, unsupported, error)
    Unloaded()

``WorkerExited`` never crosses the connection: the host's reader puts it in its own queues when
the worker process is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


# ---- host -> worker ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    settings: dict[str, Any]


@dataclass(frozen=True)
class Generate:
    id: str
    request: dict[str, Any]


@dataclass(frozen=True)
class Cancel:
    id: str


@dataclass(frozen=True)
class StatsRequest:
    pass


@dataclass(frozen=True)
class PerplexityRequest:
    text: str


@dataclass(frozen=True)
class Unload:
    pass


# ---- worker -> host ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadProgress:
    stage: str
    done: float = 0.0
    total: float | None = None
    unit: str = ""


@dataclass(frozen=True)
class Loaded:
    info: dict[str, Any]


@dataclass(frozen=True)
class LoadFailed:
    message: str
    code: str = "backend_error"


@dataclass(frozen=True)
class ChunkOut:
    id: str
    text: str
    tokens: int


@dataclass(frozen=True)
class Done:
    id: str
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class StatsReply:
    stats: dict[str, Any]


@dataclass(frozen=True)
class PerplexityReply:
    value: float | None = None
    unsupported: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Unloaded:
    pass


# ---- host only ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerExited:
    """The worker process is gone (put by the host's reader, never sent)."""


TO_WORKER = (Load, Generate, Cancel, StatsRequest, PerplexityRequest, Unload)
TO_HOST = (LoadProgress, Loaded, LoadFailed, ChunkOut, Done, StatsReply, PerplexityReply, Unloaded)
Message = Load | Generate | Cancel | StatsRequest | PerplexityRequest | Unload | \
    LoadProgress | Loaded | LoadFailed | ChunkOut | Done | StatsReply | PerplexityReply | Unloaded
_BY_NAME = {cls.__name__: cls for cls in TO_WORKER + TO_HOST}


class ProtocolError(Exception):
    """A message that is not one of the protocol's: the two ends run different moechat versions."""


def to_wire(msg: Message) -> dict[str, Any]:
    if type(msg).__name__ not in _BY_NAME:
        raise ProtocolError(f"{msg!r} is not a protocol message")
    return {"type": type(msg).__name__, **{f.name: getattr(msg, f.name) for f in fields(msg)}}


def from_wire(data: dict[str, Any]) -> Message:
    try:
        cls = _BY_NAME[data["type"]]
        return cls(**{k: v for k, v in data.items() if k != "type"})
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"the other end sent {data!r}, which this moechat does not understand "
                            "(install the same moechat version in both environments)") from exc


__all__ = [c.__name__ for c in TO_WORKER + TO_HOST] + [
    "Message", "ProtocolError", "WorkerExited", "from_wire", "to_wire"]
