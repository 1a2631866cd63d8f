"""The GPU expert cache as the graphed decode step sees it, and the policy that fills it.

``DeviceExperts`` keeps one device table [MoE layers, experts] of cache slots (-1: not cached)
beside the per-layer ``OffloadedExperts`` modules, which stay the owners of the slots and their
contents (prefill still uses them). Inside the CUDA graph it computes a token's routed experts with
the int4 kernel, reading misses from pinned host memory. Between tokens it reads the step's
routing (the one small device-to-host copy per token), counts hits and misses, and lets
``CachePolicy`` swap a few experts in.

Why not LRU: with misses read in place, admitting an expert costs its bytes over PCIe a second
time, so a cache should only take an expert that will be used again soon. Qwen3 routing is close
to uniform (docs/facts.md), where LRU churns every miss in and gains nothing; where some experts are
hot (a real model on a topic), decayed use counts find them and keep them.
"""

from __future__ import annotations

from typing import Any

import torch


class CachePolicy:
    """Decayed use counts per (layer, expert) with a half-life in tokens. Per token, missed
    experts used clearly more than the least used cached ones of their layer replace them, the
    best pairs first, up to a number of swaps that follows the measured locality of the routing:
    the share of a token's experts its predecessor used too. Where that share is near chance
    (uniform routing) a swap never pays for its copy and none are made; where routing repeats,
    up to ``max_swaps`` per token (a bound on the PCIe bytes swaps add)."""

    def __init__(self, layers: int, experts: int, half_life: float = 16.0, max_swaps: int = 32,
                 margin: float = 0.5):
        self.freq = torch.zeros(layers, experts)
        self.decay = 0.5 ** (1.0 / half_life)
        self.max_swaps, self.margin = max_swaps, margin
        self.prev: torch.Tensor | None = None
        self.locality = 0.0

    def observe(self, ids: torch.Tensor) -> None:
        """``ids`` [layers, top_k]: the experts one token used."""
        self.freq.mul_(self.decay)
        self.freq.scatter_add_(1, ids, torch.ones(ids.shape, dtype=self.freq.dtype))
        if self.prev is not None:
            overlap = (ids[:, :, None] == self.prev[:, None, :]).any(-1).float().mean().item()
            self.locality = 0.9 * self.locality + 0.1 * overlap
        self.prev = ids.clone()

    def budget(self) -> int:
        """Swaps allowed this token: none at chance-level locality, all at 30 % and above."""
        chance = self.prev.shape[1] / self.freq.shape[1] if self.prev is not None else 0.0
        share = (self.locality - chance - 0.05) / 0.25
        return int(self.max_swaps * min(1.0, max(0.0, share)))

    def swaps(self, ids: torch.Tensor, table: torch.Tensor) -> list[tuple[int, int, int]]:
        """(layer, expert to admit, expert to evict) for this token, best first."""
        n = self.budget()
        missed = table.gather(1, ids) < 0
        if n == 0 or not bool(missed.any()):
            return []
        k = ids.shape[1]
        cand_freq, order = self.freq.gather(1, ids).masked_fill(~missed, float("-inf")).sort(1, descending=True)
        cand = ids.gather(1, order)
        victim_freq, victim = self.freq.masked_fill(table < 0, float("inf")).topk(k, dim=1, largest=False)
        gain = (cand_freq - victim_freq).flatten()
        best = torch.argsort(gain, descending=True)[:n]
        return [(int(i) // k, int(cand.flatten()[i]), int(victim.flatten()[i])) for i in best
                if bool(gain[i] > self.margin)]


class DeviceExperts:
    """Routed experts of the graphed decode step (CUDA, int4 experts)."""

    def __init__(self, experts: list[Any], counters: Any, policy: CachePolicy | None = None,
                 hybrid: Any = None, switch: bool = False):
        from moechat.backends.moe_offload import kernels  # imports triton: only on this path

        self.kernels = kernels
        self.experts, self.counters = experts, counters
        self.hybrid = hybrid          # a HybridMisses: some misses computed by the CPU meanwhile
        self.hybrid_on = hybrid is not None
        # switch (miss_policy auto): hand misses to the CPU only while the recent tokens miss at
        # least hybrid.min_misses experts per layer; with fewer the hand-over costs more than it saves
        self.switch = switch and hybrid is not None
        self.misses_per_layer: float | None = None
        first = experts[0]
        self.device = first.device
        self.num_experts = first.store.num_experts
        self.expert_bytes = first.expert_bytes
        self.table_host = torch.full((len(experts), self.num_experts), -1, dtype=torch.int32)
        if self.device.type == "cuda":
            self.table_host = self.table_host.pin_memory()
        self.table = torch.full_like(self.table_host, -1, device=self.device)
        self.policy = policy or CachePolicy(len(experts), self.num_experts)
        self.empty = torch.empty(1, dtype=torch.uint8, device=self.device)     # stands in for no slots
        self.empty_scale = torch.empty(1, dtype=first.store.scale_dtype, device=self.device)
        self.sync_table()

    def sync_table(self) -> None:
        """Rebuild the device table from the modules' slot maps (after prefill moved experts)."""
        self.table_host.fill_(-1)
        for i, mod in enumerate(self.experts):
            if mod.lru:
                e = torch.tensor(list(mod.lru.keys()), dtype=torch.long)
                s = torch.tensor(list(mod.lru.values()), dtype=torch.int32)
                self.table_host[i, e] = s
        self.table.copy_(self.table_host, non_blocking=True)

    def _proj(self, mod: Any, name: str) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """The kernel's (cache q, cache scale, host q, host scale) and, with zero points, theirs."""
        src = mod.src[name]
        c = mod.cache[name] if mod.slots else None
        cached = c is not None
        tensors = (c.data if cached else self.empty, c.scale if cached else self.empty_scale, src.data, src.scale)
        zeros = {}
        if src.zero is not None:
            zeros = {"cache_z": c.zero if cached else self.empty, "host_z": src.zero}
        return tensors, zeros

    def experts_out(self, moe: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Each selected expert's output [top_k, hidden] in float32, unweighted. In hybrid decode
        (``w`` given) the CPU's experts are handed over first and give 0 here: ``cpu_out`` has
        their weighted sum."""
        mod = self.experts[moe]
        table = self.table[moe]
        use = None
        if self.hybrid_on and w is not None:
            use = self.hybrid.publish(self.kernels, moe, x, ids, w, table)
        gu, gu_z = self._proj(mod, "gate_up")
        dn, dn_z = self._proj(mod, "down")
        h = self.kernels.int4_expert_gemv(x, ids, table, *gu, use=use, **gu_z)   # [k, 2I]
        return self.kernels.int4_expert_gemv(h, ids, table, *dn, act=True, use=use, **dn_z)

    def cpu_out(self, moe: int) -> torch.Tensor | None:
        """The weighted sum of layer ``moe``'s experts the CPU computed (hybrid decode), else None."""
        return self.hybrid.cpu_out(self.kernels, moe) if self.hybrid_on else None

    def __call__(self, moe: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum, as ``OffloadedExperts`` gives it."""
        out = (self.experts_out(moe, x, ids, w) * w[:, None].float()).sum(0)
        cpu = self.cpu_out(moe)
        return (out if cpu is None else out + cpu).to(x.dtype)

    def before_token(self) -> None:
        if self.hybrid_on:
            self.hybrid.before_token()

    def after_token(self, routing: torch.Tensor) -> None:
        """Count the token's hits and misses, then let the policy swap experts in (stream-ordered
        before the next step, which reads the new table)."""
        ids = routing.to("cpu")                                  # waits for the step
        c = self.counters
        missed = self.table_host.gather(1, ids) < 0
        misses = int(missed.sum())
        c.hits += ids.numel() - misses
        c.misses += misses
        if self.hybrid_on:
            c.hybrid_tokens += 1
            self.hybrid.after_token(missed.sum(1), c)
        else:
            c.bytes_h2d += misses * self.expert_bytes
            c.zero_copy_experts += misses
        if self.switch:
            now = misses / ids.shape[0]
            m = self.misses_per_layer
            self.misses_per_layer = now if m is None else 0.9 * m + 0.1 * now
            self.hybrid_on = self.misses_per_layer >= self.hybrid.min_misses
        self.policy.observe(ids)
        swaps = self.policy.swaps(ids, self.table_host)
        for layer, expert, victim in swaps:
            mod = self.experts[layer]
            slot = mod.replace(expert, victim)
            self.table_host[layer, victim] = -1
            self.table_host[layer, expert] = slot
        if swaps:
            self.table.copy_(self.table_host, non_blocking=True)


def simulate(trace: torch.Tensor, experts: int, slots: int, policy: str = "lfu", **policy_args) -> dict:
    """Replay a routing trace [tokens, layers, top_k] through a cache of ``slots`` per layer that
    starts with experts 0..slots-1, as the engine's does. ``lru``: every miss is copied in over
    the least recently used expert (the eager path). ``lfu``: misses are read in place and
    ``CachePolicy`` swaps (the graphed path). Returns the hit rate and the experts that crossed
    PCIe per token (misses, plus swaps for ``lfu``)."""
    from collections import OrderedDict

    tokens, layers, top_k = trace.shape
    hits = moved = swapped = 0
    if policy == "lru":
        caches = [OrderedDict((e, None) for e in range(slots)) for _ in range(layers)]
        for t in range(tokens):
            for layer in range(layers):
                cache, now = caches[layer], trace[t, layer].tolist()
                for e in now:
                    if e in cache:
                        hits += 1
                        cache.move_to_end(e)
                for e in now:
                    if e not in cache:
                        moved += 1
                        if len(cache) >= slots:
                            victim = next((v for v in cache if v not in now), None)
                            if victim is None:
                                continue
                            del cache[victim]
                        cache[e] = None
    elif policy == "lfu":
        pol = CachePolicy(layers, experts, **policy_args)
        table = torch.full((layers, experts), -1, dtype=torch.int32)
        table[:, :slots] = torch.arange(slots, dtype=torch.int32)
        for t in range(tokens):
            ids = trace[t]
            missed = int((table.gather(1, ids) < 0).sum())
            hits += ids.numel() - missed
            moved += missed
            pol.observe(ids)
            for layer, expert, victim in pol.swaps(ids, table):
                table[layer, expert], table[layer, victim] = table[layer, victim], -1
                swapped += 1
        moved += swapped
    else:
        raise ValueError(f"unknown policy {policy!r}")
    lookups = tokens * layers * top_k
    return {"policy": policy, "slots": slots, "hit_rate": round(hits / lookups, 4),
            "experts_moved_per_token": round(moved / tokens, 3), "swaps_per_token": round(swapped / tokens, 3)}
