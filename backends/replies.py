"""Driving a generation by hand: a one-message request, a stream read to its end, a stream
stopped after a few chunks. Used by the contract suite (``backends/testing.py``) and by scripts
that run where pytest is not installed (``scripts/vllm_gpu_check.py``)."""

from __future__ import annotations

from typing import Any

from moechat.backends.api import GenerateRequest, Message, SamplingParams


def chat(text: str, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(messages=[Message(role="user", content=text)], sampling=SamplingParams(**sampling))


def collect(events) -> tuple[str, Any]:
    """The streamed text and the last event (the one with the finish reason)."""
    text, last = "", None
    for ev in events:
        if ev.kind == "chunk":
            text += ev.text
        last = ev
    return text, last


def stop_after(gen, chunks: int) -> tuple[int, Any]:
    """Read ``gen`` (a manager generation), pressing Stop once ``chunks`` chunks have come; the
    chunks seen and the last event."""
    seen, last = 0, None
    for ev in gen:
        if ev.kind == "chunk":
            seen += 1
            if seen == chunks:
                gen.stop()
        last = ev
    return seen, last
