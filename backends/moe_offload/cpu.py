"""Routed int4 experts computed by the CPU, memory-bound, from the store's own bytes.

``cpu_experts.c`` (beside this file) is compiled once per machine with the system's C compiler
(``cc -O3 -march=native``, about a second) into the converted-experts cache folder and loaded with
ctypes: no Python headers, no torch headers, no build step at install. The library's name holds
the source, the compiler, the flags and the processor's model and flags, so a cache folder shared
by two machines never hands one the other's instructions. Where the native build fails (a compiler that
does not know ``-march=native``), the portable one (no ``-march``: baseline instructions, the
same source's scalar widening) is tried; where there is no compiler or neither builds,
``CpuExperts`` falls back to torch (the reference dequantization and two matrix products per
layer): the same numbers, hundreds of times slower (it writes every expert out in float32
first). ``why`` says which is used.

The kernel reads the int4 layout of ``quant.py`` that the GPU kernels read too, so host memory
holds one copy of every expert.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moechat.backends.moe_offload import quant

SOURCE = Path(__file__).with_name("cpu_experts.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread"]
# tried in this order; -fopenmp-simd honours `omp simd` reductions (earlier versions of the kernel
# had them; a --baseline comparison builds those)
BUILDS = (("native", ["-march=native", "-fopenmp-simd"]), ("portable", []))
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def _machine_key() -> str:
    """What -march=native depends on: the processor's model and flags."""
    info = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "flags", "Features")):
                info += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return info


def build_library(folder: Path, source: Path = SOURCE) -> tuple[Any, str]:
    """(the loaded library, which build it is) or (None, the reason it is not there). ``source``:
    another version of cpu_experts.c (a benchmark's comparison); the installed one by default."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc, gcc or clang) on PATH: CPU experts run through torch"
    errors = []
    for name, extra in BUILDS:
        lib_path, error = _compiled(Path(folder), Path(source), cc, FLAGS + extra)
        if lib_path is not None:
            return _load(lib_path, name)
        errors.append(f"{name}: {error}")
    return None, f"the CPU expert kernel did not compile ({'; '.join(errors)[:400]}): torch is used"


def _compiled(folder: Path, source: Path, cc: str, flags: list[str]) -> tuple[Path | None, str]:
    """The library built with ``flags`` (cached by source, compiler, flags and processor), or the error."""
    what = source.read_bytes() + " ".join([cc, *flags]).encode() + _machine_key().encode()
    key = hashlib.sha256(what).hexdigest()[:16]
    lib_path = folder / f"cpu_experts-{key}.so"
    if lib_path.exists():
        return lib_path, ""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120)
        if done.returncode:
            return None, done.stderr.strip()[:300] or f"{cc} exited with {done.returncode}"
        os.replace(tmp, lib_path)
        return lib_path, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(lib_path: Path, build: str) -> tuple[Any, str]:
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as exc:
        return None, f"the CPU expert kernel could not be loaded ({exc}): torch is used"
    lib.engine_new.restype = _P
    lib.engine_new.argtypes = [_I, _I, _I, _I, _I]
    lib.engine_free.argtypes = [_P]
    lib.engine_threads.argtypes = [_P]
    lib.experts_layer.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P, _P, _P]
    lib.worker_new.restype = _P
    lib.worker_new.argtypes = [_P, _I, _I] + [_P] * 12 + [_L]
    lib.worker_arm.argtypes = [_P, _I]
    lib.worker_timeouts.argtypes = [_P]
    lib.worker_free.argtypes = [_P]
    try:
        lib.experts_layer_ext.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P]
        lib.worker_set_ext.argtypes = [_P, _P, _P, _I]
        lib.kernel_isa.restype = ctypes.c_char_p
        isa = lib.kernel_isa().decode()
    except AttributeError:          # an earlier version (a benchmark's --baseline)
        isa = "an earlier version"
    return lib, f"{build} build, {isa}"


def default_threads() -> int:
    """torch's thread count (the physical cores) less one for the thread that drives the GPU:
    the kernel's threads wait for each other between stages, so none may lose its core."""
    return max(1, torch.get_num_threads() - 1)


class CpuExperts:
    """One layer's routed experts for one token on the CPU: ``layer(moe, x, ids, w)`` gives
    ``sum_j w[j] * expert_ids[j](x)`` in float32, from the int4 store as it lies."""

    def __init__(self, store: Any, layers: tuple[int, ...], threads: int | None = None,
                 cache_dir: Path | None = None, compiled: bool = True, source: Path = SOURCE):
        if store.fmt != "int4":
            raise ValueError("the CPU expert kernel reads int4 experts")
        self.store, self.layers = store, tuple(layers)
        self.threads = threads or default_threads()
        self.k_max = 64
        self.lib, self.why = (None, "torch (asked for)")
        if compiled:
            if cache_dir is None:
                from moechat.backends.moe_offload.build import default_cache_dir
                cache_dir = default_cache_dir()
            self.lib, self.why = build_library(Path(cache_dir) / "kernels", source)
        self.handle = None
        if self.lib is not None:
            self.handle = self.lib.engine_new(self.threads, store.hidden, store.intermediate, store.group, self.k_max)
            self.why = f"compiled kernel ({self.why}), {self.threads} threads"
        # experts of an int4 checkpoint: zero points and/or fp16 scales (experts_layer_ext)
        self.ext = store.zero or store.scale_dtype == torch.float16
        self.ids = torch.zeros(self.k_max, dtype=torch.int32)
        self.w = torch.zeros(self.k_max, dtype=torch.float32)

    @property
    def compiled(self) -> bool:
        return self.handle is not None

    def pointers(self, layer: int) -> tuple[int, int, int, int]:
        p = self.store.layers[layer]
        return (p["gate_up"].data.data_ptr(), p["gate_up"].scale.data_ptr(),
                p["down"].data.data_ptr(), p["down"].scale.data_ptr())

    def zero_pointers(self, layer: int) -> tuple[int, int]:
        """The zero points' addresses (gate_up, down), 0 (NULL) where the store has none."""
        p = self.store.layers[layer]
        return tuple(p[n].zero.data_ptr() if p[n].zero is not None else 0 for n in ("gate_up", "down"))

    def layer(self, moe: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` [H], ``ids`` [n], ``w`` [n] on the CPU -> [H] float32."""
        layer = self.layers[moe]
        x = x.detach().float().contiguous()
        n = ids.numel()
        if not self.compiled or n > self.k_max:
            return reference_layer(self.store, layer, x, ids, w)
        out = torch.empty(self.store.hidden, dtype=torch.float32)
        self.ids[:n].copy_(ids)
        self.w[:n].copy_(w)
        if self.ext:
            gq, gs, dq, ds = self.pointers(layer)
            gz, dz = self.zero_pointers(layer)
            self.lib.experts_layer_ext(self.handle, x.data_ptr(), n, self.ids.data_ptr(), self.w.data_ptr(),
                                       gq, gs, gz, dq, ds, dz, int(self.store.scale_dtype == torch.float16),
                                       out.data_ptr())
            return out
        self.lib.experts_layer(self.handle, x.data_ptr(), n, self.ids.data_ptr(), self.w.data_ptr(),
                               *self.pointers(layer), out.data_ptr())
        return out

    def close(self) -> None:
        if self.handle is not None:
            self.lib.engine_free(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def reference_layer(store: Any, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same sum through the reference dequantization (``quant.dequantize``) in float32."""
    ids = ids.long()
    p = store.layers[layer]
    gu, dn = (quant.dequantize("int4", p[n].data[ids], p[n].scale[ids], torch.float32,
                               zero=None if p[n].zero is None else p[n].zero[ids]) for n in ("gate_up", "down"))
    h = torch.einsum("krc,c->kr", gu, x.float())
    g, u = h.chunk(2, dim=-1)
    y = torch.einsum("krc,kc->kr", dn, F.silu(g) * u)
    return (y * w.float()[:, None]).sum(0)
