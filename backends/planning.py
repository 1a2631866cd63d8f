"""Memory plans: what a load needs on the GPU and in host RAM, and whether it fits."""

from __future__ import annotations

from backends.api import MemoryPlan

GB = 1e9


def gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB"


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
