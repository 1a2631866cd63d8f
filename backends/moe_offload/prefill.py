"""A long prompt's missed experts, streamed to the GPU ahead of their use.

A prompt of a few hundred tokens routes to nearly every expert of every MoE layer (with uniform
routing ``coverage(t)`` of them: 1 - (1 - k/E)^t, 98 % at 200 tokens for 10 of 512), so before
any router has run, prefill knows which experts it will read over PCIe: those not in each
layer's cache. ``PrefillStream`` copies them on a side stream, layer after layer and in expert
order, into a ring of chunk buffers on the GPU, while the compute stream runs attention, the
Gated DeltaNet and the experts of chunks already there. PCIe then works through the whole
prefill instead of taking turns with the compute, and the misses cost one host-to-device copy
each, in runs of consecutive experts (a few calls a chunk instead of several an expert).

A streamed prefill leaves the cache as it was: its misses pass through the ring. Shorter prompts
(and every decode step) take the cache's path in ``engine.OffloadedExperts``: misses copied into
cache slots once their routing is known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from moechat.backends.moe_offload.plan import PREFILL_RING_BYTES
from moechat.backends.moe_offload.store import Proj

if TYPE_CHECKING:
    from moechat.backends.moe_offload.engine import OffloadedExperts

# Stream when a prompt is expected to route to at least this share of each layer's experts
# (uniform routing; a trained router spreads a long prompt about as widely, docs/moe-offload.md).
STREAM_MIN_COVERAGE = 0.9


def coverage(tokens: int, top_k: int, num_experts: int) -> float:
    """The expected share of a layer's experts that ``tokens`` tokens route to, uniform routing."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


class PrefillStream:
    """Streams the misses of one forward pass at a time (``session``) for ``modules``, the
    engine's experts modules in the order the model calls them.

    The ring holds ``slots`` chunks of ``chunk`` experts (the many-pairs path's dequantization
    chunk, so one chunk is one dequantization). Chunk ``i`` of the whole prefill goes to slot
    ``i % slots``: its copy waits (on the GPU) until chunk ``i - slots`` has been computed, and
    its computation waits until its copy is done."""

    def __init__(self, modules: list["OffloadedExperts"], top_k: int, chunk: int, slots: int | None = None):
        self.modules, self.top_k = modules, top_k
        self.chunk = chunk
        first = modules[0] if modules else None
        self.device = first.device if first is not None else torch.device("cpu")
        self.num_experts = first.store.num_experts if first is not None else 0
        if slots is None and first is not None:
            slots = max(2, PREFILL_RING_BYTES // (chunk * first.expert_bytes))
        self.slots = slots or 0
        self._copy_stream = None
        self._plan: list[tuple[int, list[int]]] = []   # (experts module index, experts) a chunk
        self._ring: dict[str, Proj] = {}
        self._ready: list = []
        self._free: list = []
        self._issued = 0
        self._used = 0
        self._next_module = 0

    @property
    def active(self) -> bool:
        return bool(self._ring)

    def pays(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens streams: a cache that does not hold every expert
        (a prompt copies its misses there whatever the decode step's miss policy), and a prompt
        that routes to most of them."""
        mods = self.modules
        return bool(mods) and 0 < mods[0].slots < self.num_experts \
            and coverage(tokens, self.top_k, self.num_experts) >= STREAM_MIN_COVERAGE

    @contextlib.contextmanager
    def session(self, tokens: int) -> Iterator[None]:
        """Around one forward pass of ``tokens`` tokens: plan and start the copies when it pays."""
        if not self.pays(tokens):
            yield
            return
        self._start()
        try:
            yield
        finally:
            self._stop()

    def chunks(self, module: "OffloadedExperts") -> Iterator[dict[str, Proj]]:
        """The ring slots of ``module``'s streamed experts, one chunk after another, each once its
        copy is done; a slot goes back to the copies when the caller asks for the next one (or
        the iteration ends), after the caller queued its work on it."""
        m = self._current(module)
        self._next_module += 1
        while self._used < len(self._plan) and self._plan[self._used][0] == m:
            s = self._used % self.slots
            if self._ready:
                torch.cuda.current_stream(self.device).wait_event(self._ready[s])
            yield {name: p.rows(s * self.chunk, (s + 1) * self.chunk) for name, p in self._ring.items()}
            if self._free:
                self._free[s].record(torch.cuda.current_stream(self.device))
            self._used += 1
            self._issue()

    def streamed(self, module: "OffloadedExperts") -> list[int]:
        """The experts of ``module`` this forward streams, in ring order (chunk after chunk)."""
        m = self._current(module)
        return [e for i, experts in self._plan if i == m for e in experts]

    def _current(self, module: "OffloadedExperts") -> int:
        """The index of the module whose experts the stream serves next, which must be ``module``."""
        m = self._next_module
        if self.modules[m] is not module:
            raise RuntimeError(f"prefill streamed layer {self.modules[m].layer} next, "
                               f"but layer {module.layer} asked for its experts")
        return m

    # ---- the copies --------------------------------------------------------------------------------
    def _start(self) -> None:
        self._plan = []
        for i, mod in enumerate(self.modules):
            missing = [e for e in range(self.num_experts) if e not in mod.lru]
            self._plan += [(i, missing[a:a + self.chunk]) for a in range(0, len(missing), self.chunk)]
        self._ring = {name: p.empty(self.slots * self.chunk, self.device) for name, p in self.modules[0].src.items()}
        if self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            # the ring was allocated on the compute stream: the copies start after that
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ready = [torch.cuda.Event() for _ in range(self.slots)]
            self._free = [torch.cuda.Event() for _ in range(self.slots)]
        self._issued = self._used = self._next_module = 0
        self._issue()

    def _issue(self) -> None:
        """Queue the copies of every planned chunk whose ring slot has been handed back."""
        ctx = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()
        with ctx:
            while self._issued < len(self._plan) and self._issued - self._used < self.slots:
                i = self._issued
                s = i % self.slots
                if self._free and i >= self.slots:
                    self._copy_stream.wait_event(self._free[s])
                mod, experts = self._plan[i]
                self._copy(self.modules[mod], experts, s * self.chunk)
                if self._ready:
                    self._ready[s].record(self._copy_stream)
                self._issued += 1

    def _copy(self, mod: "OffloadedExperts", experts: list[int], at: int) -> None:
        """``experts`` (ascending) of ``mod`` into ring rows from ``at``: one copy a tensor per run
        of consecutive experts."""
        runs, j = [], 0
        while j < len(experts):
            k = j
            while k + 1 < len(experts) and experts[k + 1] == experts[k] + 1:
                k += 1
            runs.append((experts[j], k - j + 1, at + j))
            j = k + 1
        for name, p in mod.src.items():
            for e0, n, row in runs:
                self._ring[name].put(row, p, e0, n)
        mod.count_copies(len(experts))

    def _stop(self) -> None:
        if self._copy_stream is not None:
            # nothing queued on the copy stream may outlive the ring it writes
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        self._plan, self._ring, self._ready, self._free = [], {}, [], []
