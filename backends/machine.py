"""What this machine has: GPUs and host memory. No torch import: GPUs are read from nvidia-smi."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

GiB = 1024**3


@dataclass
class Gpu:
    index: int
    name: str
    total: int
    used: int


@dataclass
class Machine:
    gpus: list[Gpu] = field(default_factory=list)
    host_total: int = 0
    host_available: int = 0
    cpu_count: int = 1

    @property
    def gpu_total(self) -> int | None:
        return self.gpus[0].total if self.gpus else None


def gpus() -> list[Gpu]:
    """GPUs as nvidia-smi reports them; an empty list without NVIDIA GPUs."""
    if os.environ.get("MOECHAT_NO_GPU") or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        idx, name, total, used = [p.strip() for p in line.split(",")]
        found.append(Gpu(int(idx), name, int(total) * 1024**2, int(used) * 1024**2))
    return found


def this_machine() -> Machine:
    vm = psutil.virtual_memory()
    return Machine(gpus(), vm.total, vm.available, os.cpu_count() or 1)


def process_rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def peak_rss(pid: int) -> int | None:
    """The most resident memory process ``pid`` has had (Linux VmHWM), else its current RSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return process_rss(pid)


def data_dir() -> Path:
    """Where chats, the demo model and caches live: $MOECHAT_HOME, else the user data dir."""
    env = os.environ.get("MOECHAT_HOME")
    if env:
        path = Path(env)
    else:
        import platformdirs
        path = Path(platformdirs.user_data_dir("moechat"))
    path.mkdir(parents=True, exist_ok=True)
    return path
