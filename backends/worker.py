"""The worker process: one backend instance, one loaded model, driven over a connection.

Started by ``BackendManager`` as ``python -m moechat.backends.worker --address A --backend module:Class``
(possibly under another interpreter, e.g. vLLM's venv). Messages are plain dicts, both ways:

    host -> worker: {"op": "load", "settings": {...}}
                    {"op": "generate", "id": str, "request": {...}}
                    {"op": "cancel", "id": str}      # stop that generation at the next token
                    {"op": "stats"}   # answered at once, also while a reply streams
                    {"op": "perplexity", "text": str} / {"op": "unload"}
    worker -> host: {"op": "progress", "stage", "done", "total", "unit"}
                    {"op": "loaded", "info": {...}} / {"op": "load_error", "message": str}
                    {"op": "chunk", "id", "text", "tokens"}
                    {"op": "done", "id", "finish_reason", "usage": {...}, "error": str|None,
                     "code": str|None}   # BackendError.code, e.g. context_length_exceeded
                    {"op": "stats", "stats": {...}}
                    {"op": "perplexity", "value": float|None, "unsupported": bool, "error": str|None}

The worker times generations itself (time to first token, prefill and decode speed), so the
numbers do not include the trip through the connection.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from multiprocessing.connection import Client
from queue import Queue
from typing import Any

from loguru import logger

from moechat.backends.api import Backend, BackendError, GenerateRequest, Progress


def resolve(path: str) -> type[Backend]:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def memory_stats() -> dict[str, Any]:
    """Host memory of this process, and GPU memory: from torch where this process already has a
    CUDA context, else from nvidia-smi (a stats call must never create a CUDA context, which
    costs GPU memory in processes that run none, such as vLLM's front end)."""
    import psutil

    from moechat.backends.machine import gpus as smi_gpus

    stats: dict[str, Any] = {"worker_rss_bytes": psutil.Process().memory_info().rss}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "used_bytes": total - free, "total_bytes": total,
                         "allocated_bytes": torch.cuda.memory_allocated(i),
                         "peak_allocated_bytes": torch.cuda.max_memory_allocated(i)})
        stats["gpus"] = gpus
    elif found := smi_gpus():
        stats["gpus"] = [{"index": g.index, "used_bytes": g.used, "total_bytes": g.total} for g in found]
    return stats


class Worker:
    def __init__(self, conn, backend_cls: type[Backend]):
        self.conn = conn
        self.backend = backend_cls()
        self.backend_cls = backend_cls
        self.send_lock = threading.Lock()
        self.inbox: Queue[dict] = Queue()
        self.cancelled: set[str] = set()
        self.loaded = False
        self.last_usage: dict[str, Any] = {}

    def send(self, msg: dict) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def read_forever(self) -> None:
        """Reader thread: cancels and stats take effect at once (stats are read while a reply
        streams), everything else queues for the main loop."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.inbox.put({"op": "exit"})
                return
            if msg.get("op") == "cancel":
                self.cancelled.add(msg["id"])
            elif msg.get("op") == "stats":
                self.send_quietly({"op": "stats", "stats": self.stats()})
            else:
                self.inbox.put(msg)

    def run(self) -> None:
        threading.Thread(target=self.read_forever, daemon=True, name="worker-reader").start()
        while True:
            msg = self.inbox.get()
            op = msg.get("op")
            if op == "load":
                self.load(msg["settings"])
            elif op == "generate":
                self.generate(msg["id"], msg["request"])
            elif op == "perplexity":
                self.send({"op": "perplexity", **self.perplexity(msg["text"])})
            elif op in ("unload", "exit"):
                if self.loaded:
                    try:
                        self.backend.unload()
                    except Exception:
                        logger.exception("unload raised")
                self.send_quietly({"op": "unloaded"})
                return

    def send_quietly(self, msg: dict) -> None:
        try:
            self.send(msg)
        except (OSError, EOFError):
            pass

    def load(self, raw_settings: dict) -> None:
        started = time.perf_counter()

        def progress(p: Progress) -> None:
            self.send({"op": "progress", **asdict(p)})

        try:
            budget = os.environ.get("MOECHAT_VRAM_BUDGET_GB")
            if budget:  # the benchmark's VRAM budget: enforced, not only requested
                from moechat.backends.planning import apply_vram_budget
                apply_vram_budget(float(budget))
            settings = self.backend_cls.Settings.model_validate(raw_settings)
            info = self.backend.load(settings, progress) or {}
        except BackendError as exc:
            self.send({"op": "load_error", "message": str(exc)})
            return
        except Exception as exc:
            logger.exception("load failed")
            self.send({"op": "load_error", "message": describe_crash(exc)})
            return
        self.loaded = True
        info = dict(info)
        info["load_time_s"] = time.perf_counter() - started
        info.setdefault("context_length", self.backend.context_length())
        info.update(memory_stats())
        self.send({"op": "loaded", "info": info})

    def generate(self, gen_id: str, raw_request: dict) -> None:
        request = GenerateRequest.model_validate(raw_request)
        started = time.perf_counter()
        first = last = None
        completion = 0
        prompt_tokens = None
        finish, error, code = None, None, None
        try:
            for chunk in self.backend.generate(request, lambda: gen_id in self.cancelled):
                now = time.perf_counter()
                if chunk.prompt_tokens is not None:
                    prompt_tokens = chunk.prompt_tokens
                if chunk.tokens:
                    first = first or now
                    last = now
                    completion += chunk.tokens
                if chunk.text or chunk.tokens:
                    self.send({"op": "chunk", "id": gen_id, "text": chunk.text, "tokens": chunk.tokens})
                if chunk.finish_reason:
                    finish, error = chunk.finish_reason, chunk.error
                    break
        except BackendError as exc:
            finish, error, code = "error", str(exc), exc.code
        except Exception as exc:
            logger.exception("generate failed")
            finish, error, code = "error", describe_crash(exc), "backend_error"
        if finish is None:
            finish = "cancelled" if gen_id in self.cancelled else "stop"
        self.cancelled.discard(gen_id)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "ttft_s": (first - started) if first else None,
            "prefill_tok_s": (prompt_tokens / (first - started)) if first and prompt_tokens else None,
            "decode_tok_s": ((completion - 1) / (last - first)) if first and last and last > first else None,
            "total_s": time.perf_counter() - started,
        }
        self.last_usage = usage
        self.send({"op": "done", "id": gen_id, "finish_reason": finish, "usage": usage, "error": error,
                   "code": code})

    def perplexity(self, text: str) -> dict[str, Any]:
        """The loaded model's perplexity on ``text``; ``unsupported`` when the backend cannot score."""
        if not self.loaded:
            return {"value": None, "unsupported": False, "error": "No model is loaded."}
        try:
            return {"value": float(self.backend.perplexity(text)), "unsupported": False, "error": None}
        except NotImplementedError:
            return {"value": None, "unsupported": True, "error": None}
        except BackendError as exc:
            return {"value": None, "unsupported": False, "error": str(exc)}
        except Exception as exc:
            logger.exception("perplexity failed")
            return {"value": None, "unsupported": False, "error": describe_crash(exc)}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.loaded:
            try:
                stats.update(self.backend.stats())
            except Exception as exc:
                stats["stats_error"] = str(exc)
        stats.update(memory_stats())
        return stats


def describe_crash(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "out of memory" in text.lower() or name == "OutOfMemoryError":
        return (f"The backend ran out of memory ({text}). Lower the context length or the memory "
                "budget, or pick a more compact backend or format.")
    return f"The backend failed: {name}: {text}" if text else f"The backend failed: {name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="moechat backend worker (started by the app)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--backend", required=True, help="module:Class of the backend")
    args = parser.parse_args(argv)
    authkey = bytes.fromhex(os.environ.pop("MOECHAT_WORKER_KEY"))
    conn = Client(args.address, family="AF_UNIX", authkey=authkey)
    logger.remove()
    logger.configure(extra={"backend": "-"})
    logger.add(sys.stderr, level=os.environ.get("MOECHAT_LOG_LEVEL", "INFO"),
               format="{time:HH:mm:ss} worker[{extra[backend]}] {level} {message}")
    try:
        backend_cls = resolve(args.backend)
    except Exception as exc:
        conn.send({"op": "load_error", "message": f"The worker could not import {args.backend}: {exc}"})
        traceback.print_exc()
        return 1
    with logger.contextualize(backend=backend_cls.name):
        Worker(conn, backend_cls).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
