"""The worker process: one backend instance, one loaded model, driven over a connection.

Started by ``BackendManager`` as ``python -m moechat.backends.worker --address A --backend module:Class``
(possibly under another interpreter, e.g. vLLM's venv). The messages both ways are the typed ones
of ``moechat.backends.protocol``.

The worker carries the duties every backend would otherwise repeat: it refuses a prompt longer
than the context before the backend sees it (first from its length in characters, so a prompt of
megabytes is never tokenized, then from the backend's ``count_prompt_tokens`` and
``context_length``), ends the reply before a stop string (holding back text that may be the start of
one), ends it at the next chunk after Stop, and times generations itself (time to first token, prefill and decode speed), so the
numbers do not include the trip through the connection.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client
from queue import Queue
from typing import Any

from loguru import logger

from moechat.backends import protocol as P
from moechat.backends.api import Backend, BackendError, GenerateRequest, Progress, PromptTooLong


def resolve(path: str) -> type[Backend]:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Loading leaves freed memory in malloc's arenas: bitsandbytes quantizes weights read in the
    load dtype, so their full-size copies are freed after quantization but stay in the process's
    resident memory unless trimmed (about 0.1 GB of the 0.2 GB demo model's float32 weights; the
    amount varies from run to run with the arenas the loader's threads used)."""
    import ctypes
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)    # the process's own C library
        if trim is not None:
            trim(0)


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


# No prompt averages more characters per token than this. Ordinary text averages 3 to 5 (English,
# code); the longest tokens of byte-level BPE vocabularies (runs of spaces or of one punctuation
# mark) are a few dozen characters, and a prompt made only of those is not one a person writes.
# A prompt longer than context * MAX_CHARS_PER_TOKEN characters cannot fit, so it is refused
# without being tokenized (tokenizing megabytes takes seconds of a worker every user waits on).
MAX_CHARS_PER_TOKEN = 64


def prompt_chars(request: GenerateRequest) -> int:
    """The characters of the prompt's text (the chat template adds a few tokens more, never fewer)."""
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.content) for m in request.messages)


def prompt_too_long(prompt_tokens: int, context: int) -> PromptTooLong:
    return PromptTooLong(f"The prompt is {prompt_tokens} tokens but this model takes at most {context} tokens, "
                         "prompt and reply together. Shorten the chat or start a new one.")


class StopStrings:
    """Ends a streamed reply before the first stop string. ``feed`` returns the text that is safe
    to send now and whether a stop string was reached; text that may be the start of a stop
    string is held back until the next chunk tells."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[:min(found)], ""
            return out, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Worker:
    def __init__(self, conn, backend_cls: type[Backend]):
        self.conn = conn
        self.backend = backend_cls()
        self.backend_cls = backend_cls
        self.send_lock = threading.Lock()
        self.inbox: Queue[P.Message | None] = Queue()
        self.cancelled: set[str] = set()
        self.loaded = False
        self.last_usage: dict[str, Any] = {}

    def send(self, msg: P.Message) -> None:
        with self.send_lock:
            self.conn.send(P.to_wire(msg))

    def read_forever(self) -> None:
        """Reader thread: cancels and stats take effect at once (stats are read while a reply
        streams), everything else queues for the main loop. ``None`` means the host is gone."""
        while True:
            try:
                msg = P.from_wire(self.conn.recv())
            except (EOFError, OSError):
                self.inbox.put(None)
                return
            except P.ProtocolError as exc:
                logger.error("{}", exc)
                continue
            if isinstance(msg, P.Cancel):
                self.cancelled.add(msg.id)
            elif isinstance(msg, P.StatsRequest):
                self.send_quietly(P.StatsReply(self.stats()))
            else:
                self.inbox.put(msg)

    def run(self) -> None:
        threading.Thread(target=self.read_forever, daemon=True, name="worker-reader").start()
        while True:
            msg = self.inbox.get()
            if isinstance(msg, P.Load):
                self.load(msg.settings)
            elif isinstance(msg, P.Generate):
                self.generate(msg.id, msg.request)
            elif isinstance(msg, P.PerplexityRequest):
                self.send(self.perplexity(msg.text))
            elif msg is None or isinstance(msg, P.Unload):
                if self.loaded:
                    try:
                        self.backend.unload()
                    except Exception:
                        logger.exception("unload raised")
                self.send_quietly(P.Unloaded())
                return

    def send_quietly(self, msg: P.Message) -> None:
        try:
            self.send(msg)
        except (OSError, EOFError):
            pass

    def load(self, raw_settings: dict) -> None:
        started = time.perf_counter()

        def progress(p: Progress) -> None:
            self.send(P.LoadProgress(p.stage, p.done, p.total, p.unit))

        try:
            from moechat.backends.planning import VRAM_BUDGET_ENV
            budget = os.environ.get(VRAM_BUDGET_ENV)
            if budget and self.backend_cls.torch_gpu_memory:  # the benchmark's VRAM budget: enforced
                from moechat.backends.planning import cap_vram
                cap_vram(float(budget))
            settings = self.backend_cls.Settings.model_validate(raw_settings)
            info = self.backend.load(settings, progress) or {}
        except BackendError as exc:
            self.send(P.LoadFailed(str(exc), exc.code))
            return
        except Exception as exc:
            logger.exception("load failed")
            self.send(P.LoadFailed(describe_crash(exc)))
            return
        self.loaded = True
        info = dict(info)
        info["load_time_s"] = time.perf_counter() - started
        info.setdefault("context_length", self.backend.context_length())
        release_freed_memory()
        info.update(memory_stats())
        self.send(P.Loaded(info))

    def check_prompt_length(self, request: GenerateRequest) -> int | None:
        """The prompt's token count when the backend can tell; PromptTooLong when it does not fit.
        A prompt too long for the context by its characters alone is refused before it is tokenized."""
        context = self.backend.context_length()
        chars = prompt_chars(request)
        if context and chars > context * MAX_CHARS_PER_TOKEN:
            raise PromptTooLong(f"The prompt is {chars:,} characters but this model takes at most {context} tokens, "
                                f"prompt and reply together, and no text of more than "
                                f"{context * MAX_CHARS_PER_TOKEN:,} characters fits in that. "
                                "Shorten the chat or start a new one.")
        prompt_tokens = self.backend.count_prompt_tokens(request)
        if prompt_tokens is not None and context and prompt_tokens >= context:
            raise prompt_too_long(prompt_tokens, context)
        return prompt_tokens

    def generate(self, gen_id: str, raw_request: dict) -> None:
        request = GenerateRequest.model_validate(raw_request)
        started = time.perf_counter()
        first = last = None
        completion = 0
        prompt_tokens = None
        finish, error, code = None, None, None
        stops = StopStrings(request.sampling.stop)
        stream = None
        try:
            prompt_tokens = self.check_prompt_length(request)
            stream = self.backend.generate(request, lambda: gen_id in self.cancelled)
            for chunk in stream:
                now = time.perf_counter()
                if chunk.prompt_tokens is not None:
                    prompt_tokens = chunk.prompt_tokens
                if chunk.tokens:
                    first = first or now
                    last = now
                    completion += chunk.tokens
                text, stopped = stops.feed(chunk.text)
                if text or chunk.tokens:
                    self.send(P.ChunkOut(gen_id, text, chunk.tokens))
                if stopped:
                    finish = "stop"
                    break
                if chunk.finish_reason:
                    finish, error = chunk.finish_reason, chunk.error
                    break
                if gen_id in self.cancelled:   # Stop: ended here even if the backend checks rarely
                    finish = "cancelled"
                    break
        except BackendError as exc:
            finish, error, code = "error", str(exc), exc.code
        except Exception as exc:
            logger.exception("generate failed")
            finish, error, code = "error", describe_crash(exc), "backend_error"
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()   # a stop string ended it early: the backend's generator stops here
        if rest := stops.flush():   # held back as a possible stop string's start; it was not
            self.send(P.ChunkOut(gen_id, rest, 0))
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
        self.send(P.Done(gen_id, finish, usage, error, code))

    def perplexity(self, text: str) -> P.PerplexityReply:
        """The loaded model's perplexity on ``text``; ``unsupported`` when the backend cannot score."""
        if not self.loaded:
            return P.PerplexityReply(error="No model is loaded.")
        try:
            return P.PerplexityReply(value=float(self.backend.perplexity(text)))
        except NotImplementedError:
            return P.PerplexityReply(unsupported=True)
        except BackendError as exc:
            return P.PerplexityReply(error=str(exc))
        except Exception as exc:
            logger.exception("perplexity failed")
            return P.PerplexityReply(error=describe_crash(exc))

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
    # a crash in native code (a CUDA library, llama.cpp) prints the Python stack to stderr, whose
    # last lines the app puts into its sentence (WorkerProcess.last_words)
    faulthandler.enable()
    authkey = bytes.fromhex(os.environ.pop("MOECHAT_WORKER_KEY"))
    conn = Client(args.address, family="AF_UNIX", authkey=authkey)
    logger.remove()
    logger.configure(extra={"backend": "-"})
    logger.add(sys.stderr, level=os.environ.get("MOECHAT_LOG_LEVEL", "INFO"),
               format="{time:HH:mm:ss} worker[{extra[backend]}] {level} {message}")
    try:
        backend_cls = resolve(args.backend)
    except Exception as exc:
        conn.send(P.to_wire(P.LoadFailed(f"The worker could not import {args.backend}: {exc}")))
        traceback.print_exc()
        return 1
    with logger.contextualize(backend=backend_cls.name):
        Worker(conn, backend_cls).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
