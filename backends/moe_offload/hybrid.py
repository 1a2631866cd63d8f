"""Hybrid decode: a token's missed experts split between the CPU and the GPU's PCIe reads.

Per MoE layer, as soon as the router has chosen, the GPU (``kernels.publish``) hands the first
``round(share * misses)`` missed experts and the normed hidden state to the CPU through pinned
host memory and raises the layer's flag; it then reads its own misses in place over PCIe (and its
hits from the cache) while a CPU thread (``cpu_experts.c``) computes the CPU's experts from the
same int4 bytes in host memory; ``kernels.wait_cpu`` waits for the CPU's flag and the CPU's sum
is added in the MoE output. Both pipes work at once and the CUDA graph of the step stays one graph:
the flags replace host syncs.

``share`` starts from the two pipes' bandwidths measured at load and follows what each token
measures: the CPU's time per layer (its own clock) against the GPU's (the GPU's global timer from
the hand-over to the wait), nudged each token so that both finish together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Mailbox:
    """Pinned host memory both sides address, one entry per MoE layer."""

    x: torch.Tensor           # [L, H] float32: the normed hidden state
    ids: torch.Tensor         # [L, K] int32: the CPU's experts
    w: torch.Tensor           # [L, K] float32: their routing weights
    n: torch.Tensor           # [L] int32: how many
    ready: torch.Tensor       # [L] int32: the token number once published (GPU writes)
    done: torch.Tensor        # [L] int32: the token number once served (CPU writes)
    y: torch.Tensor           # [L, H] float32: the CPU's weighted sum
    cpu_times: torch.Tensor   # [L, 2] int64: CPU start/end, ns
    gpu_times: torch.Tensor   # [L, 3] int64: hand-over, wait start, wait end (GPU global timer), ns
    error: torch.Tensor       # [1] int32: the GPU gave up waiting

    @classmethod
    def allocate(cls, layers: int, top_k: int, hidden: int, pin: bool) -> "Mailbox":
        def z(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)
        return cls(z(layers, hidden), z(layers, top_k, dtype=torch.int32), z(layers, top_k), z(layers, dtype=torch.int32),
                   z(layers, dtype=torch.int32), z(layers, dtype=torch.int32), z(layers, hidden),
                   z(layers, 2, dtype=torch.int64), z(layers, 3, dtype=torch.int64), z(1, dtype=torch.int32))


class HybridMisses:
    """The CPU's share of a token's misses, the mailboxes and the CPU thread that serves them.

    ``share`` is the fraction of each layer's misses the CPU takes (1.0: ``miss_policy: cpu``, all
    misses on the CPU); ``adaptive`` lets the measured times move it."""

    def __init__(self, cpu: Any, layers: int, top_k: int, device: torch.device, expert_bytes: int,
                 share: float, adaptive: bool = True, timeout_s: float = 5.0, min_misses: int = 1):
        self.cpu, self.layers, self.top_k, self.device = cpu, layers, top_k, device
        self.min_misses = min_misses   # a layer with fewer misses keeps them all on the GPU
        self.expert_bytes = expert_bytes
        self.adaptive = adaptive
        hidden = cpu.store.hidden
        on_gpu = device.type == "cuda"
        self.box = Mailbox.allocate(layers, top_k, hidden, pin=on_gpu)
        self.share_host = torch.full((layers,), float(share), dtype=torch.float32, pin_memory=on_gpu)
        self.share = self.share_host.to(device)
        self.seq = torch.zeros(1, dtype=torch.int32, device=device)
        self.use = torch.ones(top_k, dtype=torch.int32, device=device)
        self.ncpu = torch.zeros(layers, dtype=torch.int32, device=device)
        self.out = torch.zeros(hidden, dtype=torch.float32, device=device)
        self.token = 0
        self.value = float(share)
        # running totals for stats and the controller
        self.rates = {"cpu": None, "pcie": None}
        self.worker = None
        if on_gpu:
            if not cpu.compiled:
                raise RuntimeError("hybrid decode needs the compiled CPU expert kernel")
            ptrs = [cpu.pointers(layer) for layer in cpu.layers]
            self._ptrs = [torch.tensor([p[i] for p in ptrs], dtype=torch.int64) for i in range(4)]
            b = self.box
            self.worker = cpu.lib.worker_new(
                cpu.handle, layers, top_k, *(p.data_ptr() for p in self._ptrs), b.ready.data_ptr(), b.done.data_ptr(),
                b.x.data_ptr(), b.ids.data_ptr(), b.n.data_ptr(), b.w.data_ptr(), b.y.data_ptr(),
                b.cpu_times.data_ptr(), int(timeout_s * 1e9))
            if cpu.ext:   # zero points and/or fp16 scales of an int4 checkpoint
                zp = [cpu.zero_pointers(layer) for layer in cpu.layers]
                self._zptrs = [torch.tensor([z[i] for z in zp], dtype=torch.int64) for i in range(2)]
                has_zero = cpu.store.zero
                cpu.lib.worker_set_ext(self.worker, *(z.data_ptr() if has_zero else None for z in self._zptrs),
                                       int(cpu.store.scale_dtype == torch.float16))

    # ---- inside the step -----------------------------------------------------------------------
    def publish(self, kernels: Any, moe: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        """Hand layer ``moe``'s CPU share to the CPU; the mask of the GPU's experts."""
        kernels.publish(x, ids, w, table, self.share, self.seq, self.use, self.ncpu, self.box, moe, self.min_misses)
        return self.use

    def cpu_out(self, kernels: Any, moe: int) -> torch.Tensor:
        """The CPU's weighted sum for layer ``moe`` on the compute device (waited for on a GPU;
        computed here and now on a machine without one)."""
        if self.worker is not None:
            kernels.wait_cpu(self.ncpu, self.seq, self.box, self.out, moe)
            return self.out
        n = int(self.box.n[moe])
        b = self.box
        self.out.copy_(self.cpu.layer(moe, b.x[moe], b.ids[moe, :n], b.w[moe, :n]) if n else torch.zeros_like(self.out))
        return self.out

    # ---- between tokens --------------------------------------------------------------------------
    def paused(self) -> "_Paused":
        """No CPU share while a step runs outside ``before_token`` (warm-up, graph capture)."""
        return _Paused(self)

    def before_token(self) -> None:
        self.token += 1
        self.seq.fill_(self.token)
        if self.worker is not None:
            self.cpu.lib.worker_arm(self.worker, self.token)

    def after_token(self, misses: torch.Tensor, counters: Any) -> None:
        """``misses`` [L]: the token's missed experts per layer (the step has finished)."""
        b = self.box
        if self.worker is not None and int(b.error[0]):
            b.error.zero_()
            raise RuntimeError("the CPU did not serve its experts in time (hybrid decode); "
                               "set miss_policy to pcie")
        n = b.n.to(torch.int64)
        cpu_n, gpu_n = int(n.sum()), int((misses - n).clamp_min(0).sum())
        counters.cpu_experts += cpu_n
        counters.zero_copy_experts += gpu_n
        counters.bytes_h2d += gpu_n * self.expert_bytes
        if self.worker is None:
            return
        busy = n > 0
        t_cpu = ((b.cpu_times[:, 1] - b.cpu_times[:, 0]) * busy).sum().item() / 1e9
        g = b.gpu_times
        t_gpu_busy = ((g[:, 1] - g[:, 0]) * busy).sum().item() / 1e9
        t_gpu = (g[:, 1] - g[:, 0]).sum().item() / 1e9
        counters.cpu_s += t_cpu
        counters.pcie_s += t_gpu
        counters.gpu_wait_s += (g[:, 2] - g[:, 1]).sum().item() / 1e9
        counters.cpu_bytes += cpu_n * self.expert_bytes
        if not self.adaptive or t_cpu <= 0 or t_gpu_busy <= 0:
            return
        # both should end together: move the share against the imbalance, half a step at a time
        imbalance = (t_cpu - t_gpu_busy) / (t_cpu + t_gpu_busy)
        self.set_share(min(1.0, max(0.02, self.value * math.exp(-0.5 * imbalance))))

    def set_share(self, value: float) -> None:
        self.value = value
        self.share_host.fill_(value)
        self.share.copy_(self.share_host, non_blocking=True)

    def close(self) -> None:
        if self.worker is not None:
            self.cpu.lib.worker_free(self.worker)
            self.worker = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _Paused:
    def __init__(self, hybrid: HybridMisses):
        self.hybrid = hybrid

    def __enter__(self):
        self.saved = self.hybrid.value
        self.hybrid.share.zero_()

    def __exit__(self, *exc):
        self.hybrid.set_share(self.saved)


def initial_share(cpu_gb_s: float, pcie_gb_s: float) -> float:
    """The CPU's share of the misses that makes both pipes finish together, from their rates."""
    total = cpu_gb_s + pcie_gb_s
    return cpu_gb_s / total if total > 0 else 0.0
