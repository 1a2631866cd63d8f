"""The offload engine: the resident model on the compute device, routed experts in host memory,
a per-layer expert cache on the compute device, and the generation loop.

Family-agnostic: an adapter (``adapters/``) says which checkpoint tensors are routed experts and
builds the resident model with every fused ``*Experts`` module replaced by ``OffloadedExperts``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moechat.backends.moe_offload import quant
from moechat.backends.moe_offload.plan import cache_slots, kv_and_state_bytes, resolve_policy
from moechat.backends.moe_offload.prefill import PrefillStream
from moechat.backends.moe_offload.store import ExpertStore, Proj

GiB = 1024**3
SMALL_BATCH_PAIRS = 64          # up to this many (token, expert) pairs: one gathered bmm
DEQUANT_CHUNK = 32              # experts dequantized at once in the many-pairs (prefill) path


@dataclass
class Counters:
    hits: int = 0          # expert lookups served by the device cache
    misses: int = 0        # lookups that were not in the cache
    copied: int = 0        # experts copied host -> device
    cpu_experts: int = 0   # experts computed on the CPU
    zero_copy_experts: int = 0  # misses the GPU read straight from pinned host memory
    bytes_h2d: int = 0
    cpu_bytes: int = 0     # expert bytes the CPU read (hybrid decode)
    cpu_s: float = 0.0     # CPU time on those experts, summed over layers
    pcie_s: float = 0.0    # GPU time on its experts (hits and PCIe reads) in hybrid layers
    gpu_wait_s: float = 0.0  # GPU time waiting for the CPU's experts
    hybrid_tokens: int = 0   # decode tokens that handed misses to the CPU
    tokens: int = 0        # decode tokens
    prefill_tokens: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0

    def reset(self) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, type(getattr(self, k))())


@dataclass
class Options:
    expert_format: str = "int4"
    int4_group_size: int = 128
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    cache_experts: int | None = None     # device cache slots per layer; None = from the budget
    vram_budget_gb: float | None = None
    miss_policy: str = "auto"            # auto | pcie | hybrid | cpu | copy
    max_context: int = 8192
    cache_dir: Path | None = None
    cpu_threads: int | None = None


class OffloadedExperts(nn.Module):
    """Drop-in for transformers' fused experts: ``forward(x [T,H], top_k_index, top_k_weights)``.

    Holds no parameters: the weights live in the ``ExpertStore`` (host) and in this layer's
    device cache slots. Lookups are a dict per layer (LRU order); one host sync per layer call
    reads the routed expert ids."""

    def __init__(self, layer: int, store: ExpertStore, counters: Counters, act: Callable,
                 device: torch.device, dtype: torch.dtype, slots: int, policy: str):
        super().__init__()
        self.layer = layer
        self.store = store
        self.counters = counters
        self.act = act
        self.device = device
        self.dtype = dtype
        self.policy = policy
        self.src = store.layers[layer]
        self.slots = slots
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, oldest first
        self.free = list(range(slots))[::-1]
        self.cpu_kernel = None      # (CpuExperts, this layer's index): decode misses on the CPU
        self.stream = None          # the engine's PrefillStream: a long prompt's misses arrive there
        self.cache: dict[str, Proj] = {}
        self.top_k = None
        if slots:
            self.cache = {name: p.empty(slots, device) for name, p in self.src.items()}
        self.expert_bytes = sum(p.expert_bytes for p in self.src.values())

    # ---- the cache ------------------------------------------------------------------------
    def _insert(self, expert: int, keep: set[int]) -> int | None:
        if self.free:
            slot = self.free.pop()
        else:
            victim = next((e for e in self.lru if e not in keep), None)
            if victim is None:
                return None
            slot = self.lru.pop(victim)
        self._fill(expert, slot)
        return slot

    def replace(self, expert: int, victim: int) -> int:
        """Put ``expert`` in ``victim``'s slot (the cache policy of the graphed decode step)."""
        slot = self.lru.pop(victim)
        self._fill(expert, slot)
        return slot

    def _fill(self, expert: int, slot: int) -> None:
        for name, p in self.src.items():
            self.cache[name].put(slot, p, expert)
        self.lru[expert] = slot
        self.count_copies(1)

    def count_copies(self, n: int) -> None:
        """``n`` experts of this layer copied to the compute device (PCIe bytes on a GPU)."""
        self.counters.copied += n
        self.counters.bytes_h2d += n * self.expert_bytes if self.device.type == "cuda" else 0

    def fill_first(self) -> None:
        """Fill an empty cache with experts 0..slots-1, one copy per tensor: before any routing
        is known every expert is as good a guess as another, and a full cache needs no free-slot
        bookkeeping later."""
        if self.lru or not self.slots:
            return
        n = self.slots
        for name, p in self.src.items():
            self.cache[name].put(0, p, 0, n)
        self.lru = OrderedDict((e, e) for e in range(n))
        self.free = []

    # ---- compute ----------------------------------------------------------------------------
    def _dense(self, proj: Proj, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dense weights [len(rows), R, C] of rows ``rows`` of ``proj``."""
        if self.store.fmt == "int4" and proj.data.is_cuda:
            kernels = _gpu_kernels()
            if kernels is not None:
                return kernels.int4_dequantize_rows(proj.data, proj.scale, rows, dtype, zero=proj.zero)
        return quant.dequantize(self.store.fmt, proj.data[rows], None if proj.scale is None else proj.scale[rows],
                                dtype, proj.block, None if proj.zero is None else proj.zero[rows])

    def _mlp(self, part: dict[str, Proj], rows: torch.Tensor, xs: torch.Tensor, offs: torch.Tensor,
             sizes: list[int]) -> torch.Tensor:
        """Experts ``rows`` of ``part`` on ``xs``, whose rows come in consecutive groups, one an
        expert (``offs``: the groups' int32 ends on the device, ``sizes``: their lengths): one
        dequantization and one grouped matrix product per projection."""
        h = grouped_linear(xs, self._dense(part["gate_up"], rows, xs.dtype), offs, sizes)
        g, u = h.chunk(2, dim=-1)
        return grouped_linear(self.act(g) * u, self._dense(part["down"], rows, xs.dtype), offs, sizes)

    @staticmethod
    def _accumulate(out: torch.Tensor, ys: torch.Tensor, w: torch.Tensor, tok: torch.Tensor) -> None:
        """``out[tok] += ys * w``: each pair's output times its routing weight, into its token."""
        ys = ys * w.unsqueeze(-1).to(ys.dtype)
        if ys.device != out.device:
            ys, tok = ys.to(out.device), tok.to(out.device)
        out.index_add_(0, tok, ys.to(out.dtype))

    def _run(self, src: dict[str, Proj], row_of: dict[int, int], flat: torch.Tensor, x: torch.Tensor,
             wflat: torch.Tensor, out: torch.Tensor, k: int) -> None:
        """Accumulate into ``out`` every (token, expert) pair of ``flat`` (the routed ids, on the
        host) whose expert has a row of ``src`` in ``row_of``: its output times its weight."""
        if not row_of:
            return
        lut = torch.full((self.store.num_experts,), -1, dtype=torch.long)
        lut[torch.tensor(list(row_of))] = torch.tensor(list(row_of.values()))
        row = lut[flat]
        pos = (row >= 0).nonzero().squeeze(1)            # flat positions, token-major
        if not len(pos):
            return
        dev = src["down"].data.device
        xd = x if x.device == dev else x.to(dev)
        wd = wflat if wflat.device == dev else wflat.to(dev)
        if len(pos) <= SMALL_BATCH_PAIRS:
            gu, dn = src["gate_up"], src["down"]
            # a few pairs (decode): one gathered bmm per projection
            idx = _to(torch.stack((pos, row[pos])), dev)
            pos_d, rows = idx[0], idx[1]
            xs = xd[pos_d // k]
            h = torch.bmm(xs.unsqueeze(1), self._dense(gu, rows, xs.dtype).transpose(1, 2)).squeeze(1)
            g, u = h.chunk(2, dim=-1)
            ys = torch.bmm((self.act(g) * u).unsqueeze(1), self._dense(dn, rows, xs.dtype).transpose(1, 2)).squeeze(1)
        else:
            # many pairs (prefill): sorted by expert on the host, then DEQUANT_CHUNK experts at a
            # time through _mlp
            pos = pos[torch.argsort(row[pos], stable=True)]
            rows, counts = torch.unique_consecutive(row[pos], return_counts=True)
            ends = counts.cumsum(0)
            meta = _to(torch.cat((pos, rows, ends)), dev)
            pos_d, rows_d, ends_d = meta[:len(pos)], meta[len(pos):len(pos) + len(rows)], meta[len(pos) + len(rows):]
            xs = xd[pos_d // k]
            ys = torch.empty_like(xs)
            bounds = [0] + ends.tolist()
            for c0 in range(0, len(rows), DEQUANT_CHUNK):
                c1 = min(c0 + DEQUANT_CHUNK, len(rows))
                a, b = bounds[c0], bounds[c1]
                ys[a:b] = self._mlp(src, rows_d[c0:c1], xs[a:b], (ends_d[c0:c1] - a).to(torch.int32),
                                    counts[c0:c1].tolist())
        self._accumulate(out, ys, wd[pos_d], pos_d // k)

    def _streamed(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """A streamed prefill's layer (``prefill.PrefillStream``): the hits from the cache, every
        miss from the ring as its copy lands.

        Every expert is in the cache or in this layer's stream, so the table from expert to row
        (the cache's slots, then the stream's positions) is made before the router runs, and the
        pairs are sorted by row on the compute device. The host waits once, for each row's pair
        count: it neither reads the routing nor sorts, so the compute stream idles only for that
        small copy while the copies go on."""
        k = top_k_index.shape[1]
        streamed = self.stream.streamed(self)
        first, last = self.slots, self.slots + len(streamed)    # the stream's rows follow the cache's
        lut = torch.full((self.store.num_experts,), -1, dtype=torch.long)
        lut[list(self.lru)] = torch.tensor(list(self.lru.values()), dtype=torch.long)
        lut[streamed] = torch.arange(first, last)
        if (lut < 0).any():
            raise RuntimeError(f"layer {self.layer}: experts {(lut < 0).nonzero().flatten().tolist()} "
                               "are neither cached nor streamed")
        row = _to(lut, x.device)[top_k_index.reshape(-1)]
        order = torch.argsort(row, stable=True)     # pairs by row; all t * k of them have one
        counts = torch.bincount(row, minlength=last).cpu()             # the host's one wait
        ends = counts.cumsum(0)
        starts = ends - counts
        used = counts.nonzero().flatten()
        c = self.counters
        hits = int((used < first).sum())
        c.hits += hits
        c.misses += len(used) - hits
        by_slot = {slot: e for e, slot in self.lru.items()}
        for e in sorted(by_slot[r] for r in used[:hits].tolist()):
            self.lru.move_to_end(e)
        # the parts (DEQUANT_CHUNK cache slots at a time, then one ring slot each; base: a part's
        # first row in its source) and, in one small copy, their used rows and where their pairs end
        size = self.stream.chunk
        parts = [(r0, min(r0 + DEQUANT_CHUNK, first), 0) for r0 in range(0, first, DEQUANT_CHUNK)]
        parts += [(r0, min(r0 + size, last), r0) for r0 in range(first, last, size)]
        sel = [used[(used >= r0) & (used < r1)] for r0, r1, _ in parts]
        meta = _to(torch.cat([torch.cat((s - base, ends[s] - starts[s[0]]))
                              for s, (_, _, base) in zip(sel, parts) if len(s)]), x.device)
        tok = order // k
        xs = x[tok]
        ys = torch.empty_like(xs)
        ring = self.stream.chunks(self)
        at = 0
        for (r0, _, _), s in zip(parts, sel):
            src = self.cache if r0 < first else next(ring)      # a slot once its copy has landed
            n = len(s)
            if not n:
                continue
            rows_d, offs = meta[at:at + n], meta[at + n:at + 2 * n].to(torch.int32)
            at += 2 * n
            a, b = int(starts[s[0]]), int(ends[s[-1]])
            ys[a:b] = self._mlp(src, rows_d, xs[a:b], offs, counts[s].tolist())
        for _ in ring:          # the iteration's end hands the last slot back to the copies
            pass
        out = torch.zeros_like(x)
        self._accumulate(out, ys, top_k_weights.reshape(-1)[order], tok)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.stream is not None and self.stream.active:
            return self._streamed(hidden_states, top_k_index, top_k_weights)
        x = hidden_states
        t, k = top_k_index.shape
        out = torch.zeros_like(x)
        flat = top_k_index.reshape(-1).cpu()              # the one host sync of this layer
        wflat = top_k_weights.reshape(-1)
        uniq = flat.unique().tolist()
        c = self.counters
        hit = [e for e in uniq if e in self.lru]
        miss = [e for e in uniq if e not in self.lru]
        c.hits += len(hit)
        c.misses += len(miss)
        for e in hit:
            self.lru.move_to_end(e)
        copy_misses = self.slots > 0 and (self.policy == "copy" or t > 1)
        if copy_misses and len(uniq) <= self.slots:
            keep = set(uniq)
            for e in miss:
                self._insert(e, keep)
            self._run(self.cache, {e: self.lru[e] for e in uniq}, flat, x, wflat, out, k)
            return out
        # hits from the cache, then the misses: copied in rounds of the cache's size (a prefill
        # with more distinct experts than slots), or computed where they lie (the CPU policy)
        self._run(self.cache, {e: self.lru[e] for e in hit}, flat, x, wflat, out, k)
        if copy_misses:
            for r0 in range(0, len(miss), self.slots):
                rnd = miss[r0:r0 + self.slots]
                keep = set(rnd)
                for e in rnd:
                    self._insert(e, keep)
                self._run(self.cache, {e: self.lru[e] for e in rnd}, flat, x, wflat, out, k)
        elif miss:
            c.cpu_experts += len(miss)
            if self.cpu_kernel is not None and t == 1:     # decode: the compiled int4 kernel
                kernel, moe = self.cpu_kernel
                sel = torch.isin(flat, torch.tensor(miss))
                y = kernel.layer(moe, x[0].cpu(), flat[sel].to(torch.int32), wflat.cpu()[sel].float())
                out[0] += y.to(out.device, out.dtype)
            else:
                self._run(self.src, {e: e for e in miss}, flat, x, wflat, out, k)
        return out


def _to(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` (host) on ``dev``: one asynchronous copy from pinned memory on a GPU."""
    return t if dev.type == "cpu" else t.pin_memory().to(dev, non_blocking=True)


def _gpu_kernels():
    try:
        from moechat.backends.moe_offload import kernels
    except ImportError:                 # no triton: torch's dequantization
        return None
    return kernels


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``x`` [M, K] in consecutive groups of ``sizes`` rows (``offs``: their int32 ends, on x's
    device); group j times ``w[j]`` [N, K] transposed -> [M, N]. One grouped GEMM where torch
    has one for these operands (bf16 on a Hopper or Blackwell GPU, any float on the CPU), else a
    product per group."""
    grouped_mm = getattr(torch, "_grouped_mm", None)      # torch >= 2.8
    if grouped_mm is not None and (x.device.type == "cpu" or (
            x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10))):
        return grouped_mm(x, w.transpose(1, 2), offs=offs)
    y = x.new_empty(x.shape[0], w.shape[1])
    a = 0
    for j, n in enumerate(sizes):
        y[a:a + n] = F.linear(x[a:a + n], w[j])
        a += n
    return y


class Engine:
    """Owns the resident model, the expert store and the caches; runs forward and generation."""

    def __init__(self, model: nn.Module, config: Any, store: ExpertStore, adapter: Any,
                 options: Options, counters: Counters, experts: list[OffloadedExperts], info: dict):
        self.model, self.config, self.store, self.adapter = model, config, store, adapter
        self.options, self.counters, self.experts, self.info = options, counters, experts, info
        self.device = torch.device(options.device)
        self._decode: DecodePath | None = None
        self.stream_prefill(PrefillStream(experts, adapter.shapes(config).top_k, DEQUANT_CHUNK))
        self._cpu_experts = None
        if store.fmt == "int4" and any(m.policy == "cpu" for m in experts):
            for i, mod in enumerate(experts):
                mod.cpu_kernel = (self.cpu_experts, i)

    def stream_prefill(self, stream: PrefillStream) -> None:
        """Long prompts' misses go through ``stream`` (its ring's shape is a test's to choose)."""
        self.prefill = stream
        for mod in self.experts:
            mod.stream = stream

    @property
    def cpu_experts(self):
        """The CPU expert kernel over this engine's store (compiled on first use)."""
        if self._cpu_experts is None:
            from moechat.backends.moe_offload.cpu import CpuExperts
            self._cpu_experts = CpuExperts(self.store, self.adapter.shapes(self.config).moe_layers,
                                           self.options.cpu_threads, self.options.cache_dir)
            self.info["cpu_kernel"] = self._cpu_experts.why
        return self._cpu_experts

    @property
    def decode_path(self) -> "DecodePath":
        """The decode step, built on first use (a CUDA graph is captured then)."""
        if self._decode is None:
            self._decode = DecodePath(self)
            self.info["decode_path"] = self._decode.kind
        return self._decode

    # ---- building ------------------------------------------------------------------------------
    @staticmethod
    def resolve_device(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            from moechat.backends.api import BackendError
            raise BackendError("device is set to cuda but torch sees no CUDA GPU here; set device to auto or cpu.")
        return device

    @classmethod
    def assemble(cls, config: Any, adapter: Any, store: ExpertStore, options: Options,
                 fill_resident: Callable[[nn.Module], None]) -> "Engine":
        """Build the resident model around ``store``: meta -> device, ``fill_resident`` loads the
        weights, then size and allocate the per-layer device caches."""
        from transformers.activations import ACT2FN

        dev = torch.device(options.device)
        counters = Counters()
        act = ACT2FN[config.hidden_act]
        shapes = adapter.shapes(config)
        holders: dict[int, Any] = {}

        class _Placeholder(nn.Module):
            def __init__(self, layer):
                super().__init__()
                self.layer = layer

        model = adapter.build_resident(config, lambda i: holders.setdefault(i, _Placeholder(i)))
        model = model.to(options.dtype)
        model.to_empty(device=dev)
        adapter.rebuild_buffers(model, dev)
        fill_resident(model)
        model.eval()
        resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        dtype_bytes = torch.empty((), dtype=options.dtype).element_size()
        kv, state = kv_and_state_bytes(config, dtype_bytes, options.max_context)
        expert_bytes = store.expert_bytes()
        n_layers = len(shapes.moe_layers)
        policy = resolve_policy(options.miss_policy, dev.type == "cuda")   # prefill, eager decode
        budget = None
        if options.cache_experts is None and dev.type == "cuda":
            budget = int(options.vram_budget_gb * GiB if options.vram_budget_gb
                         else torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_allocated(dev))
        slots = cache_slots(cache_experts=options.cache_experts, budget_bytes=budget, resident_bytes=resident_bytes,
                            kv_bytes=kv, state_bytes=state, expert_bytes=expert_bytes, moe_layers=n_layers,
                            num_experts=shapes.num_experts, top_k=shapes.top_k, policy=policy)
        experts = []
        for i in shapes.moe_layers:
            mod = OffloadedExperts(i, store, counters, act, dev, options.dtype, slots, policy)
            parent = model.model.layers[i].mlp
            parent.experts = mod
            experts.append(mod)
            if dev.type == "cuda":
                mod.fill_first()
        info = {
            "device": str(dev), "dtype": str(options.dtype).removeprefix("torch."),
            "expert_format": store.fmt, "cache_slots_per_layer": slots, "miss_policy": policy,
            "resident_gb": round(resident_bytes / GiB, 3),
            "experts_host_gb": round(store.total_bytes() / GiB, 3),
            "expert_cache_gb": round(slots * expert_bytes * n_layers / GiB, 3),
            "kv_cache_gb": round(kv / GiB, 3), "num_experts": shapes.num_experts,
            "moe_layers": n_layers, "top_k": shapes.top_k,
        }
        return cls(model, config, store, adapter, options, counters, experts, info)

    # ---- running --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: Any = None, logits_to_keep: int = 0):
        start = getattr(cache, "moe_offload_pos", 0) if cache is not None else 0
        t = input_ids.shape[1]
        # positions passed explicitly: a model with no attention layer has no cache length to read
        pos = torch.arange(start, start + t, device=self.device).unsqueeze(0)
        with self.prefill.session(t):
            out = self.model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True,
                             position_ids=pos, logits_to_keep=logits_to_keep)
        cache = out.past_key_values
        cache.moe_offload_pos = start + t
        return out.logits, cache

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], sampler: "Sampler", max_new_tokens: int,
                     stop_ids: set[int], should_stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Yield generated token ids, ending on a stop id (yielded), the limit or should_stop."""
        c = self.counters
        path = self.decode_path
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        t0 = time.perf_counter()
        logits, cache = self.forward(ids, None, logits_to_keep=1)
        step = path.start(cache, len(prompt_ids))
        del cache
        history = list(prompt_ids)
        tok = sampler(logits[0, -1], history)
        c.prefill_s += time.perf_counter() - t0
        c.prefill_tokens += len(prompt_ids)
        for n in range(max_new_tokens):
            yield tok
            history.append(tok)
            if tok in stop_ids or n + 1 >= max_new_tokens or should_stop():
                return
            t0 = time.perf_counter()
            tok = sampler(step(tok), history)
            c.decode_s += time.perf_counter() - t0
            c.tokens += 1

    def stats(self) -> dict[str, Any]:
        c = self.counters
        lookups = c.hits + c.misses
        steps = max(c.tokens + c.prefill_tokens, 1)
        out = dict(self.info)
        out.update({
            "expert_cache_hit_rate": round(c.hits / lookups, 4) if lookups else None,
            "experts_copied": c.copied,
            "pcie_bytes_per_token": int(c.bytes_h2d / steps),
            "cpu_experts_per_token": round(c.cpu_experts / steps, 2),
            "pcie_experts_per_token": round(c.zero_copy_experts / max(c.tokens, 1), 2),
            "cpu_expert_gb_s": round(c.cpu_bytes / c.cpu_s / 1e9, 1) if c.cpu_s else None,
            "pcie_expert_gb_s": round(c.zero_copy_experts * self.store.expert_bytes() / c.pcie_s / 1e9, 1)
            if c.pcie_s else None,
            "hybrid_token_share": round(c.hybrid_tokens / c.tokens, 3) if c.tokens and c.hybrid_tokens else None,
            "gpu_wait_ms_per_token": round(1e3 * c.gpu_wait_s / c.tokens, 3) if c.tokens and c.gpu_wait_s else None,
            "decode_tok_s": round(c.tokens / c.decode_s, 3) if c.decode_s else None,
            "prefill_tok_s": round(c.prefill_tokens / c.prefill_s, 3) if c.prefill_s else None,
        })
        if self.device.type == "cuda":
            out["gpu_allocated_gb"] = round(torch.cuda.memory_allocated(self.device) / GiB, 3)
            out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / GiB, 3)
        try:
            import psutil
            out["host_rss_gb"] = round(psutil.Process().memory_info().rss / GiB, 3)
        except Exception:
            pass
        return out


class DecodePath:
    """How this engine decodes after prefill, chosen once:

    * ``graph``: the static decode step (``decode.py``) captured as a CUDA graph, routed experts
      read by the int4 kernel from the GPU cache or pinned host memory (CUDA, int4 experts,
      ``miss_policy`` auto, pcie, hybrid or cpu, triton importable); with ``hybrid`` (or ``auto``
      where the CPU pays) a share of the misses is computed by the CPU meanwhile
      (``hybrid.py``), with ``cpu`` all of them;
    * ``eager``: the same step run op by op, routed experts through ``OffloadedExperts`` (the
      CPU, other formats or miss policies);
    * ``transformers``: transformers' own modules with their cache (families without a step).
    """

    def __init__(self, engine: Engine, uniform_routing: bool = False, miss_policy: str | None = None):
        self.engine = engine
        self.decoder = None
        self.graph = None
        self.device_experts = None
        self.hybrid = None
        self.graph_pcie = None          # auto's graph for tokens with few misses (no CPU hand-over)
        self.kind = "transformers"
        self.note = ""
        self.policy = miss_policy or engine.options.miss_policy
        cls = engine.adapter.decoder_class()
        if cls is None or not cls.supports(engine.config):
            return
        routed = self._eager_routed
        if self._wants_graph():
            try:
                from moechat.backends.moe_offload.cache import DeviceExperts
                self.hybrid = self._hybrid()
                if self.hybrid is not None or self.policy != "cpu":
                    self.device_experts = DeviceExperts(engine.experts, engine.counters, hybrid=self.hybrid,
                                                        switch=self.policy == "auto")
                    routed = self.device_experts
            except ImportError as exc:            # no triton: the eager step still beats transformers
                self.note = f"no CUDA graph: {exc}"
        self.decoder = cls(engine.model, engine.config, engine.options.max_context, routed,
                           engine.adapter.shapes(engine.config).moe_layers, fused=self.device_experts is not None)
        self.decoder.uniform_routing = uniform_routing     # benchmarks: a cache's worst case
        self.kind = "eager"
        if self.device_experts is not None:
            from moechat.backends.moe_offload.decode import GraphedStep
            try:
                self.graph = GraphedStep(self.decoder)
                self.kind = "graph"
                if self.device_experts.switch:     # auto: a second graph with every miss over PCIe
                    self.device_experts.hybrid_on = False
                    self.graph_pcie = GraphedStep(self.decoder)
                    self.device_experts.hybrid_on = True
            except RuntimeError as exc:             # capture failed: same step, op by op
                self.note = f"CUDA graph capture failed: {exc}"

    def _wants_graph(self) -> bool:
        e = self.engine
        return (e.device.type == "cuda" and e.store.fmt == "int4" and self.policy in ("auto", "pcie", "hybrid", "cpu")
                and e.experts and e.store.pin)

    def _hybrid(self):
        """The CPU's part of the graphed step's misses, or None (all over PCIe). ``auto`` takes
        the CPU where the two pipes' bandwidths, measured here, say it pays."""
        e = self.engine
        info = e.info
        if self.policy == "pcie":
            info["decode_miss_policy"] = "pcie"
            return None
        cpu = e.cpu_experts
        if not cpu.compiled:
            self.note = cpu.why
            info["decode_miss_policy"] = "cpu (eager, torch)" if self.policy == "cpu" else "pcie"
            return None
        from moechat.backends.moe_offload.hybrid import HybridMisses, initial_share
        rates = measure_pipes(e)
        info.update({"cpu_expert_gb_s_at_load": rates[0], "pcie_expert_gb_s_at_load": rates[1]})
        share = 1.0 if self.policy == "cpu" else initial_share(*rates)
        if self.policy == "auto" and share < AUTO_MIN_CPU_SHARE:
            info["decode_miss_policy"] = "pcie"
            return None
        info["decode_miss_policy"] = "cpu" if self.policy == "cpu" else "hybrid"
        shapes = e.adapter.shapes(e.config)
        return HybridMisses(cpu, len(shapes.moe_layers), shapes.top_k, e.device, e.store.expert_bytes(), share,
                            adaptive=self.policy != "cpu",
                            min_misses=1 if self.policy == "cpu" else HYBRID_MIN_MISSES)

    def close(self) -> None:
        """Stop the CPU thread of hybrid decode (a new DecodePath replaces this one)."""
        if self.hybrid is not None:
            self.hybrid.close()

    def _eager_routed(self, moe: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.engine.experts[moe](x[None], ids[None], w[None])[0]

    def start(self, cache: Any, length: int) -> Callable[[int], torch.Tensor]:
        """After a prefill of ``length`` tokens left ``cache``: a function token -> next logits."""
        engine = self.engine
        if self.decoder is None:
            state = {"cache": cache}

            def hf_step(tok: int) -> torch.Tensor:
                logits, state["cache"] = engine.forward(torch.tensor([[tok]]), state["cache"], logits_to_keep=1)
                return logits[0, -1]
            return hf_step
        dec = self.decoder
        dec.load_cache(cache, length)
        if self.device_experts is not None:
            self.device_experts.sync_table()
        limit = dec.max_context
        pos = [length]

        def step(tok: int) -> torch.Tensor:
            if pos[0] >= limit:
                raise ValueError(f"the chat reached max_context ({limit} tokens)")
            pos[0] += 1
            dec.token.fill_(tok)
            graph = self.graph
            if self.device_experts is not None:
                self.device_experts.before_token()
                if self.graph_pcie is not None and not self.device_experts.hybrid_on:
                    graph = self.graph_pcie
            logits = graph.run() if graph is not None else dec.step()
            if self.device_experts is not None:
                self.device_experts.after_token(dec.routing)
            return logits
        return step


AUTO_MIN_CPU_SHARE = 0.1   # auto computes misses on the CPU where it would take at least this share
# hybrid: a layer with fewer misses keeps them on the GPU (the CPU's hand-over and wake-up cost
# about as much as reading one or two experts over PCIe)
HYBRID_MIN_MISSES = 3


def measure_pipes(engine: Engine, experts: int = 10, reps: int = 5) -> tuple[float, float]:
    """GB/s of expert weights through each pipe, measured on this machine: the CPU kernel over
    ``experts`` experts of one layer, and the GPU's int4 kernel reading as many from host memory
    (different experts each time, so neither reads from a cache). Each pipe's rate is its fastest
    of ``reps`` rounds: a round takes well under a millisecond, so one stall of the host (a process
    ending beside it, a thread woken late) would otherwise stand for the pipe, and ``auto`` would
    leave the CPU out for the whole load (it once measured the CPU at 1.1 GB/s against 40-47 in the
    loads before and after; bench/results/compare-20261206-2013-NVIDIA-H100-80GB-HBM3-llamacpp)."""
    from moechat.backends.moe_offload import kernels

    store, cpu, dev = engine.store, engine.cpu_experts, engine.device
    layer = store.layers[min(store.layers)]
    b = store.expert_bytes()
    g = torch.Generator().manual_seed(0)
    picks = [torch.randperm(store.num_experts, generator=g)[:experts] for _ in range(reps + 1)]
    x = torch.randn(store.hidden, generator=g) * 0.5
    w = torch.full((experts,), 1.0 / experts)
    cpu.layer(0, x, picks[0].int(), w)
    best = math.inf
    for p in picks[1:]:
        t0 = time.perf_counter()
        cpu.layer(0, x, p.int(), w)
        best = min(best, time.perf_counter() - t0)
    cpu_rate = experts * b / best / 1e9
    table = torch.full((store.num_experts,), -1, dtype=torch.int32, device=dev)
    empty_q = torch.empty(1, dtype=torch.uint8, device=dev)
    empty_s = torch.empty(1, dtype=store.scale_dtype, device=dev)
    xd = x.to(dev, torch.bfloat16)
    gu, dn = layer["gate_up"], layer["down"]

    def one(ids):
        hid = kernels.int4_expert_gemv(xd, ids, table, empty_q, empty_s, gu.data, gu.scale, host_z=gu.zero)
        kernels.int4_expert_gemv(hid, ids, table, empty_q, empty_s, dn.data, dn.scale, act=True, host_z=dn.zero)
    one(picks[0].to(dev))
    ids = [p.to(dev) for p in picks[1:]]
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in ids]
    for p, (start, end) in zip(ids, marks):   # timed on the GPU: the launches overlap as in decode
        start.record()
        one(p)
        end.record()
    torch.cuda.synchronize(dev)
    pcie_rate = experts * b / (min(s.elapsed_time(e) for s, e in marks) / 1e3) / 1e9
    return round(cpu_rate, 1), round(pcie_rate, 1)


class Sampler:
    """Greedy when temperature is 0; else repetition penalty, temperature, top-k, top-p. Runs
    where the logits are (on a GPU: no 600 KB copy of the logits per token)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.repetition_penalty = repetition_penalty
        self.seed = seed if seed is not None else int(time.time_ns() % (2**63))
        self.gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if device not in self.gens:
            self.gens[device] = torch.Generator(device=device)
            self.gens[device].manual_seed(self.seed)
        return self.gens[device]

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        logits = logits.float()
        if self.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), device=logits.device)
            sel = logits[idx]
            logits[idx] = torch.where(sel > 0, sel / self.repetition_penalty, sel * self.repetition_penalty)
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, -1)
        if self.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = sp.cumsum(0) - sp < self.top_p
            keep[0] = True
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[si[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self._gen(probs.device)))
