"""The backend-neutral parts of a memory plan: the machine as a plan sees it, fixed costs,
showing a plan, checking it after a load, and capping a worker's GPU memory.

Each backend builds its own plan (``Backend.plan(model, settings, machine)``) from the model's
config facts (``moechat.backends.shapes``) and the helpers here; nothing here knows a backend.
Plans are made in the app process; nothing here imports torch except ``cap_vram``, which the
worker calls. How each number is made is written down in docs/memory-plan.md.

Units: settings named ``*_gb`` are read the way the backend that owns them reads them
(accelerate's ``"16GB"`` is 10^9 bytes; moe-offload's ``vram_budget_gb`` is GiB). Sizes shown to
people are GB (10^9 bytes).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from moechat.backends.api import MemoryItem, MemoryPlan

GB = 1e9
GiB = 1024**3

# Host memory of a worker process before any weights: Python, torch, transformers (measured on
# CPU at about 0.38 GB with the demo model, about 0.1 GB more where bitsandbytes finds triton
# installed and imports its kernels; CUDA's libraries and context add about 1.5 GB).
WORKER_HOST_CPU = int(0.6 * GB)
WORKER_HOST_GPU = int(2.0 * GB)
# GPU memory the CUDA context and the allocator's slack take before any tensor.
CUDA_CONTEXT = int(0.5 * GiB)
# Env overrides, so a plan can be tried (and tested) as if on another machine.
# Both in GiB, the way cards and DIMMs are sized (a "16 GB card" has 16 GiB).
HOST_RAM_ENV = "MOECHAT_HOST_RAM_GB"      # host RAM available
VRAM_BUDGET_ENV = "MOECHAT_VRAM_BUDGET_GB"  # GPU memory the worker may use (enforced by the worker)
# Post-load check: a difference above both of these is reported.
CHECK_RATIO = 0.25
CHECK_FLOOR = int(0.5 * GB)


def gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB"


# ---- the machine, as plans see it --------------------------------------------------------------

def effective_machine(machine: Any) -> Any:
    """``machine`` with the test/bench overrides applied: ``MOECHAT_HOST_RAM_GB`` sets the host
    RAM available, ``MOECHAT_VRAM_BUDGET_GB`` caps every GPU (as the worker enforces it)."""
    if machine is None:
        from moechat.backends.machine import Machine
        machine = Machine()
    ram = os.environ.get(HOST_RAM_ENV)
    if ram:
        machine = replace(machine, host_available=int(float(ram) * GiB), host_total=int(float(ram) * GiB))
    budget = os.environ.get(VRAM_BUDGET_ENV)
    if budget and machine.gpus:
        cap = int(float(budget) * GiB)
        machine = replace(machine, gpus=[replace(g, total=min(g.total, cap), used=0) for g in machine.gpus])
    return machine


def gpu_free(machine: Any) -> int | None:
    if not machine.gpus:
        return None
    g = machine.gpus[0]
    return max(g.total - g.used, 0)


def setting(settings: Any, name: str, default: Any = None) -> Any:
    """``settings.name``, or ``default`` where the settings lack it or leave it empty."""
    value = getattr(settings, name, None)
    return default if value is None else value


def dtype_bytes(setting_value: str | None, gpu: bool) -> int:
    """Bytes per value of a ``dtype`` setting (auto: bfloat16 on a GPU, float32 on the CPU)."""
    if setting_value in (None, "", "auto"):
        return 2 if gpu else 4
    return 4 if setting_value == "float32" else 2


def context(model: Any, setting_value: int | None, default: int | None = None) -> int:
    """The context a plan sizes for: the setting, at most the model's own."""
    own = model.context_length or default or 4096
    return min(setting_value, own) if setting_value else own


def largest_fitting_context(budget: int, fixed: int, per_token: float) -> int:
    """The largest power of two of tokens that fits ``budget`` after ``fixed`` (0: none)."""
    if per_token <= 0 or budget <= fixed:
        return 0
    n = int((budget - fixed) / per_token)
    return 1 << (n.bit_length() - 1) if n >= 16 else 0


def sequence_items(ctx: int, kv: int, state: int, device: str) -> list[MemoryItem]:
    """The plan items of one sequence: its KV cache for ``ctx`` tokens and its linear-attention
    state (each left out when zero)."""
    items = []
    if kv:
        items.append(MemoryItem(f"KV cache for {ctx} tokens (attention layers)", device, kv))
    if state:
        items.append(MemoryItem("Gated DeltaNet state (one sequence)", device, state))
    return items


# ---- showing and checking ----------------------------------------------------------------------

def describe(plan: MemoryPlan) -> str:
    """One paragraph a person can act on: what is needed, what there is, what to change."""
    parts = []
    if plan.gpu_available is not None:
        parts.append(f"GPU: needs {gb(plan.gpu_bytes)} of {gb(plan.gpu_available)} available")
    elif plan.gpu_bytes:
        parts.append(f"GPU: needs {gb(plan.gpu_bytes)} but no GPU was found")
    if plan.host_available is not None:
        parts.append(f"host RAM: needs {gb(plan.host_bytes)} of {gb(plan.host_available)} available")
    verdict = "This fits." if plan.fits else "This does not fit."
    text = f"{verdict} " + "; ".join(parts) + "."
    if not plan.fits and plan.advice:
        text += " " + " ".join(plan.advice)
    return text


def table(plan: MemoryPlan) -> str:
    """The plan as lines of text: one line per item, then the totals and the verdict."""
    lines = []
    for item in plan.items:
        note = f"  ({item.note})" if item.note else ""
        lines.append(f"{item.device:<4} {gb(item.bytes):>10}  {item.what}{note}")
    lines.append(describe(plan))
    lines.extend(plan.notes)
    return "\n".join(lines)


def markdown(plan: MemoryPlan) -> str:
    """The plan as a Markdown table and its verdict, for the web page."""
    rows = ["| where | size | what |", "|---|---:|---|"]
    for item in plan.items:
        note = f" ({item.note})" if item.note else ""
        rows.append(f"| {'GPU' if item.device == 'gpu' else 'RAM'} | {gb(item.bytes)} | {item.what}{note} |")
    return "\n".join(rows + ["", ("**" + describe(plan) + "**") if not plan.fits else describe(plan)]
                     + [f"- {n}" for n in plan.notes])


def to_dict(plan: MemoryPlan) -> dict[str, Any]:
    return {"fits": plan.fits, "gpu_bytes": plan.gpu_bytes, "host_bytes": plan.host_bytes,
            "gpu_available": plan.gpu_available, "host_available": plan.host_available,
            "items": [{"what": i.what, "device": i.device, "bytes": i.bytes, "note": i.note} for i in plan.items],
            "advice": list(plan.advice), "notes": list(plan.notes), "expect": dict(plan.expect),
            "summary": describe(plan)}


def _is_weights(item: MemoryItem) -> bool:
    w = item.what.lower()
    return ("weights" in w or w.startswith("routed experts")) and "beyond" not in w


def check_after_load(plan: MemoryPlan | None, info: dict[str, Any]) -> str | None:
    """Compare ``plan`` with what the worker measured after loading (``info``: ``weight_bytes``
    by device type, ``worker_rss_bytes``, ``gpus``, and the numbers the plan ``expect``s).
    Returns a sentence when weights ended up somewhere else than planned, the worker uses far
    more memory than planned, or an expected number differs; else None. A memory difference
    counts when it is above 25 % and above 0.5 GB; an expected number must match exactly."""
    if plan is None:
        return None
    problems = []
    for key, planned in plan.expect.items():
        got = info.get(key)
        if isinstance(got, int) and got != planned:
            problems.append(f"{key.replace('_', ' ')} is {got} where the plan computed {planned}")
    measured = info.get("weight_bytes")
    if isinstance(measured, dict) and measured:
        planned_gpu = sum(i.bytes for i in plan.items if i.device == "gpu" and _is_weights(i))
        planned_host = sum(i.bytes for i in plan.items if i.device == "host" and _is_weights(i))
        got_gpu = sum(v for k, v in measured.items() if k in ("cuda", "gpu"))
        # accelerate keeps offloaded weights in host RAM and leaves "meta" parameters in the model
        got_host = sum(v for k, v in measured.items() if k in ("cpu", "meta"))
        if _differs(got_gpu, planned_gpu):
            problems.append(f"{gb(got_gpu)} of weights are on the GPU where the plan put {gb(planned_gpu)}")
        if _differs(got_host, planned_host):
            what = " (offload did not happen as planned)" if got_host < planned_host and got_gpu > planned_gpu else ""
            problems.append(f"{gb(got_host)} of weights are in host RAM where the plan put {gb(planned_host)}{what}")
    rss = info.get("worker_rss_bytes")
    if isinstance(rss, int) and rss > plan.host_bytes and _differs(rss, plan.host_bytes):
        problems.append(f"the worker uses {gb(rss)} of host RAM where the plan expected at most {gb(plan.host_bytes)}")
    gpus = info.get("gpus") or []
    if gpus and plan.gpu_available is not None:
        used = max((g.get("allocated_bytes") or 0) for g in gpus)
        if used > plan.gpu_bytes and _differs(used, plan.gpu_bytes):
            problems.append(f"torch holds {gb(used)} on the GPU where the plan expected at most {gb(plan.gpu_bytes)}")
    if not problems:
        return None
    return ("Measured memory differs from the plan: " + "; ".join(problems)
            + ". Check the settings; the plan's numbers may not hold for this model.")


def _differs(measured: int, planned: int) -> bool:
    gap = abs(measured - planned)
    return gap > CHECK_FLOOR and gap > CHECK_RATIO * max(planned, 1)


# ---- enforcing a VRAM budget (in the worker) ---------------------------------------------------

def cap_vram(budget_gib: float) -> float | None:
    """Cap this process's CUDA allocations at ``budget_gib`` GiB on every GPU (torch's
    per-process memory fraction: an allocation beyond it raises out-of-memory; the CUDA context
    is not counted). Returns the fraction, or None without CUDA. The one place a VRAM budget is
    enforced: the worker calls it for ``MOECHAT_VRAM_BUDGET_GB`` (for backends whose
    ``torch_gpu_memory`` is True), moe-offload for ``vram_budget_gb``."""
    import torch
    if not torch.cuda.is_available():
        return None
    fraction = None
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        fraction = min(1.0, budget_gib * GiB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, i)
    return fraction
