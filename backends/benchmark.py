"""Benchmark results: one JSON schema, its validator and writer, what a run records about its
machine and code, and the one budget-scaling formula for runs at reduced depth.

Producers: ``moechat bench`` (kind ``product``: a backend loaded through the BackendManager in its
worker, as a person runs it) and ``bench/moe_offload_speed.py`` (kind ``engine-profile``: the
moe-offload engine, built by the backend's own load, measured part by part). Reader:
``bench/report.py``. Every producer writes through :func:`write` and the report reads through
:func:`read`, so a file that does not fit the schema is refused at both ends. The fields are
described in docs/benchmarks.md.

No torch import here (the app imports this module through ``moechat bench``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moechat.backends.moe_offload.plan import WORKSPACE_BYTES

SCHEMA_VERSION = 2
GiB = 1024**3
# GPU memory outside the layers that a budget must still cover at any depth: the work area
# moe-offload's engine and plan reserve (the torch cap a budget becomes does not count the CUDA
# context). Used only by scaled_budget.
FIXED_GPU_BYTES = WORKSPACE_BYTES
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class BenchSchemaError(ValueError):
    """A result that does not fit the schema; the message says which file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Spread(_Strict):
    """One quantity over the measured runs (a single measurement: every field is that value)."""
    median: float | None = None
    min: float | None = None
    max: float | None = None
    values: list[float] = Field(default_factory=list)


class Gpu(_Strict):
    name: str
    total_bytes: int | None = None


class Machine(_Strict):
    gpus: list[Gpu] = Field(default_factory=list)
    cpu: str = ""
    cpu_count: int | None = None
    host_total_bytes: int | None = None
    platform: str | None = None
    python: str | None = None
    # measured GB/s (docs/benchmarks.md): cpu_copy_gb_s, cpu_read_gb_s, h2d_pinned_gb_s, h2d_pageable_gb_s,
    # gpu_copy_gb_s, and what a producer adds (an engine profile's int4 kernel rates); {} when not
    # measured, {"error": sentence} when the probe failed
    bandwidth: dict[str, Any] = Field(default_factory=dict)


class RunInfo(_Strict):
    kind: Literal["product", "engine-profile"]
    producer: str                     # "moechat bench", "bench/moe_offload_speed.py"
    date: str                         # ISO 8601 with the UTC offset
    commit: str | None = None
    dirty: bool | None = None         # uncommitted changes to tracked files; None: unknown
    card: str | None = None           # the first GPU's name; None: no GPU
    driver: str | None = None         # the NVIDIA driver version; None: no GPU
    machine: Machine = Field(default_factory=Machine)
    versions: dict[str, str | None] = Field(default_factory=dict)   # torch, transformers, triton...

    @model_validator(mode="after")
    def _date_is_iso(self) -> "RunInfo":
        try:
            when = dt.datetime.fromisoformat(self.date)
        except ValueError as exc:
            raise ValueError(f"date {self.date!r} is not ISO 8601") from exc
        if when.tzinfo is None:
            raise ValueError(f"date {self.date!r} has no UTC offset")
        return self


class Extrapolated(_Strict):
    layers: int
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    ttft_s: float | None = None
    note: str


class Case(_Strict):
    """One measured configuration: a backend on a model at a budget (and, for an engine profile,
    a routing)."""
    name: str
    backend: str
    model: str
    layers: int | None = None
    full_layers: int | None = None
    vram_budget_gb: float | None = None          # the card this case stands for
    vram_budget_applied_gb: float | None = None  # the budget enforced (scaled_budget at fewer layers)
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    load_time_s: float | None = None
    ttft_s: Spread = Field(default_factory=Spread)
    prefill_tok_s: Spread = Field(default_factory=Spread)
    decode_tok_s: Spread = Field(default_factory=Spread)
    peak_gpu_bytes: int | None = None
    peak_gpu_source: str | None = None
    peak_host_bytes: int | None = None
    backend_stats: dict[str, Any] = Field(default_factory=dict)
    extrapolated: Extrapolated | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)    # what only this producer measures

    @model_validator(mode="after")
    def _consistent(self) -> "Case":
        if self.error is None and self.decode_tok_s.median is None:
            raise ValueError(f"case {self.name!r} has neither a decode speed nor an error")
        reduced = bool(self.layers and self.full_layers and self.layers < self.full_layers)
        if self.error is None and reduced != (self.extrapolated is not None):
            raise ValueError(f"case {self.name!r}: a run at fewer layers than the model has is extrapolated, "
                             "and only such a run")
        return self


class Result(_Strict):
    schema_version: Literal[2]
    run: RunInfo
    settings: dict[str, Any] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)
    notes: list[str] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)


def validate(data: Any, source: str = "result") -> Result:
    """``data`` as a Result; raises BenchSchemaError naming ``source`` and the fields that are wrong."""
    try:
        return Result.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise BenchSchemaError(f"{source} does not fit the benchmark schema (version {SCHEMA_VERSION}, "
                               f"docs/benchmarks.md): {problems}") from None


def write(path: str | Path, data: Result | dict[str, Any]) -> Path:
    """Validate and write one result as JSON (the folder is made)."""
    result = data if isinstance(data, Result) else validate(data, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=1) + "\n")
    return path


def read(path: str | Path) -> Result:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BenchSchemaError(f"{path} is not JSON: {exc}") from None
    return validate(data, str(path))


# ---- the one budget formula and the one extrapolation --------------------------------------------

def scaled_budget(budget_gib: float, model: Any, layers: int | None, full: int | None) -> float:
    """The budget (GiB) for ``model`` (a ModelInfo) cut to ``layers`` of ``full`` layers that stands
    for a card of ``budget_gib``: the part that does not depend on depth (CUDA context and work area,
    embeddings and lm_head in bf16) stays, the rest scales with the depth. Every producer uses this one."""
    if not layers or not full or layers >= full:
        return budget_gib
    from moechat.backends.shapes import try_shapes
    s = try_shapes(model.config)
    fixed = FIXED_GPU_BYTES + ((s.embed + s.lm_head) * 2 if s else 0)
    budget = budget_gib * GiB
    return (fixed + max(budget - fixed, 0) * layers / full) / GiB


def extrapolate(decode: float | None, prefill: float | None, ttft: float | None, layers: int | None,
                full: int | None) -> dict[str, Any] | None:
    """Speeds at ``full`` layers from a run at ``layers`` (time per token scales with the depth)."""
    if not layers or not full or layers >= full:
        return None
    factor = layers / full
    return {"layers": full,
            "decode_tok_s": decode * factor if decode else None,
            "prefill_tok_s": prefill * factor if prefill else None,
            "ttft_s": ttft / factor if ttft else None,
            "note": (f"Measured with {layers} of {full} layers at full width; time per token scaled by "
                     f"{full}/{layers}, which also multiplies each token's fixed cost (embeddings, lm_head, "
                     "sampling, the worker's messages): pessimistic, badly so for a fast backend "
                     "(moe-offload on an H100: 34 tok/s extrapolated from 4 layers, 148 measured at 48).")}


def spread(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def one(value: float | None) -> dict[str, Any]:
    """A Spread of a single measurement."""
    return spread([value])


# ---- facts about this machine and this code ------------------------------------------------------

def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this code runs from; MOECHAT_GIT_COMMIT where there is no
    .git (a copy of the tree, an installed wheel)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return os.environ.get("MOECHAT_GIT_COMMIT") or None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def driver_version() -> str | None:
    if os.environ.get("MOECHAT_NO_GPU") or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def bandwidth(mb: int) -> dict[str, Any]:
    """The machine's bandwidths (moechat.backends.hwprobe in its own process, so its buffers do not
    linger); {} for ``mb`` 0, {"error": sentence} when the probe cannot run."""
    if mb <= 0:
        return {}
    try:
        out = subprocess.run([sys.executable, "-m", "moechat.backends.hwprobe", "--mb", str(mb)],
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": f"bandwidth probe failed: {exc}"}


def machine_facts(bandwidth_mb: int = 0, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cards, CPU, RAM and bandwidths; ``measured`` (already measured bandwidths) skips the probe."""
    from moechat.backends.machine import this_machine
    m = this_machine()
    return {"gpus": [{"name": g.name, "total_bytes": g.total} for g in m.gpus],
            "cpu": cpu_name(), "cpu_count": m.cpu_count, "host_total_bytes": m.host_total,
            "platform": platform.platform(), "python": platform.python_version(),
            "bandwidth": measured if measured is not None else bandwidth(bandwidth_mb)}


def run_info(kind: str, producer: str, machine: dict[str, Any], versions: dict[str, str | None] | None = None
             ) -> dict[str, Any]:
    commit, dirty = git_commit()
    gpus = machine.get("gpus") or []
    return {"kind": kind, "producer": producer, "date": now(), "commit": commit, "dirty": dirty,
            "card": gpus[0]["name"] if gpus else None, "driver": driver_version() if gpus else None,
            "machine": machine, "versions": versions or {}}


def result(run: dict[str, Any], settings: dict[str, Any], cases: list[dict[str, Any]],
           notes: list[str] | None = None, detail: dict[str, Any] | None = None) -> Result:
    """A validated Result from its parts (raises BenchSchemaError)."""
    return validate({"schema_version": SCHEMA_VERSION, "run": run, "settings": settings, "cases": cases,
                     "notes": notes or [], "detail": detail or {}}, f"this {run.get('kind')} result")


# ---- results written before this schema ------------------------------------------------------------

def upgrade_v1(old: dict[str, Any], source: str) -> Result:
    """A ``moechat bench`` result of schema 1 (written before 2026-12) in this schema, field by
    field; no number is changed. ``source`` names the original file (kept in bench/results/archive/)."""
    if old.get("schema") != 1 or not old.get("backend"):
        raise BenchSchemaError(f"{source} is not a `moechat bench` result of schema 1.")
    machine = dict(old.get("machine") or {})
    gpus = machine.get("gpus") or []
    run = {"kind": "product", "producer": "moechat bench", "date": old["date"], "commit": old.get("git_commit"),
           "dirty": old.get("git_dirty"), "card": gpus[0]["name"] if gpus else None, "driver": None,
           "machine": machine, "versions": {}}
    case = {"name": f"{old['backend']} at {old['vram_budget_gb']:g} GB" if old.get("vram_budget_gb")
            else old["backend"],
            "backend": old["backend"], "model": old.get("model", ""), "layers": old.get("layers"),
            "full_layers": old.get("full_layers"), "vram_budget_gb": old.get("vram_budget_gb"),
            "vram_budget_applied_gb": old.get("vram_budget_applied_gb"), "error": old.get("error")}
    if not old.get("error"):
        case.update({k: old.get(k) for k in ("prompt_tokens", "completion_tokens", "load_time_s", "ttft_s",
                                             "prefill_tok_s", "decode_tok_s", "peak_gpu_bytes", "peak_gpu_source",
                                             "peak_host_bytes", "backend_stats", "extrapolated")})
        case["backend_stats"] = case["backend_stats"] or {}
        case["notes"] = [old["plan_check"]] if old.get("plan_check") else []
        case["detail"] = {k: old[k] for k in ("model_summary", "load_wall_s", "prompt_tokens_requested", "plan",
                                              "load_info", "runs") if k in old}
    settings = {k: old.get(k) for k in ("backend", "model", "layers", "vram_budget_gb", "prompt_tokens_requested",
                                        "gen_tokens", "repeat", "warmup") if k in old}
    if "settings" in old:
        settings["backend_settings"] = old["settings"]
    return result(run, settings, [case], detail={"converted_from": source},
                  notes=["Converted from schema 1 (the original is in bench/results/archive/) by "
                         "moechat.backends.benchmark.upgrade_v1; no number changed."])
