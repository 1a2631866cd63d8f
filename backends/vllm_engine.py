"""vLLM's AsyncLLM driven from the (synchronous) moechat worker.

Runs only in the worker process, under the vLLM environment's Python. AsyncLLM lives on an
asyncio loop in a background thread; ``stream`` bridges its async generator to the worker's
plain generator. Streaming uses ``RequestOutputKind.DELTA``; Stop aborts the request. The
numbers in ``stats`` come from vLLM itself: the finished request's metrics (time to first
token, decode speed) and the scheduler's KV-cache usage.

vllm, torch and transformers are imported inside functions.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty, Queue
from typing import Any

from moechat.backends.api import BackendError, Chunk

STREAM_TIMEOUT_S = 600.0
FINISH = {"stop": "stop", "length": "length", "abort": "cancelled", "error": "error"}


def measure_memory() -> dict[str, Any]:
    """Host RAM (resident bytes, pinned pages included) of this process and its children (vLLM's
    engine core and workers), and GPU memory used on every GPU (nvidia-smi, so the engine's own
    processes are counted without touching CUDA here)."""
    import psutil

    from moechat.backends.machine import gpus

    me = psutil.Process()
    host = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            mem = proc.memory_info()
            host += mem.rss
        except psutil.Error:
            continue
    return {"host_bytes": host, "gpu_used_bytes": [g.used for g in gpus()], "time": time.time()}


def memory_growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    gpu = None
    if before["gpu_used_bytes"] and after["gpu_used_bytes"]:
        gpu = sum(after["gpu_used_bytes"]) - sum(before["gpu_used_bytes"])
    return {"host_bytes": after["host_bytes"] - before["host_bytes"], "gpu_bytes": gpu,
            "gpu_used_bytes": after["gpu_used_bytes"]}


# Engine arguments left out where the installed vLLM lacks them (instead of refusing the load).
OPTIONAL_ARGS = frozenset({"gdn_prefill_backend"})


class VllmEngine:
    """One AsyncLLM on its own event loop thread."""

    def __init__(self, engine_kwargs: dict[str, Any]):
        import dataclasses

        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        # a kernel choice that vLLMs older than 0.2x do not offer: they have no other kernel to avoid
        engine_kwargs = {k: v for k, v in engine_kwargs.items() if k in known or k not in OPTIONAL_ARGS}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise BackendError(f"This vLLM ({vllm.__version__}) has no {', '.join(unknown)} engine argument, "
                               "which these settings need: install vLLM 0.28 or newer in the vLLM environment "
                               "(`make vllm-env`).")

        self.scheduler: dict[str, Any] = {}
        self.last_request: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="vllm-loop")
        self.thread.start()
        args = AsyncEngineArgs(**engine_kwargs)
        self.engine = self.call(self._start(args))
        self.tokenizer = self._hf_tokenizer(engine_kwargs["tokenizer"])
        self.max_model_len = int(self.engine.model_config.max_model_len)

    async def _start(self, args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger_factory()])

    @staticmethod
    def _hf_tokenizer(folder: str) -> Any:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(folder)

    def _stat_logger_factory(self) -> Callable[..., Any]:
        """A vLLM stat logger that keeps the scheduler's latest numbers (KV-cache usage)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self.scheduler

        class KeepLatest(StatLoggerBase):
            def __init__(self, vllm_config: Any = None, engine_index: int = 0, *args: Any, **kwargs: Any):
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any = None, iteration_stats: Any = None, *args: Any, **kwargs: Any):
                if scheduler_stats is None:
                    return
                usage = getattr(scheduler_stats, "kv_cache_usage", None)
                if usage is None:
                    usage = getattr(scheduler_stats, "gpu_cache_usage", None)
                sink.update(kv_cache_usage=usage,
                            running_requests=getattr(scheduler_stats, "num_running_reqs", None),
                            waiting_requests=getattr(scheduler_stats, "num_waiting_reqs", None))

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

        return KeepLatest

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stream(self, prompt_ids: list[int], sampling: dict[str, Any], should_stop: Callable[[], bool]
               ) -> Iterator[Chunk]:
        """Stream one request as Chunks; the last one has a finish reason."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**sampling, output_kind=RequestOutputKind.DELTA)
        request_id = f"moechat-{os.getpid()}-{next(self._ids)}"
        q: Queue = Queue()
        end = object()

        async def pump() -> None:
            try:
                async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
                    q.put(out)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # reported to the consumer, never lost on the loop
                q.put(exc)
            finally:
                q.put(end)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        first = True
        stopped = False
        finish = None
        deadline = time.monotonic() + STREAM_TIMEOUT_S
        while True:
            try:
                item = q.get(timeout=0.05)
            except Empty:
                if not stopped and should_stop():
                    stopped = True
                    self.call(self.engine.abort(request_id), timeout=30)
                    future.cancel()
                if time.monotonic() > deadline:
                    self.call(self.engine.abort(request_id), timeout=30)
                    raise BackendError(f"vLLM produced no token for {STREAM_TIMEOUT_S:.0f} s.") from None
                continue
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            deadline = time.monotonic() + STREAM_TIMEOUT_S
            o = item.outputs[0] if item.outputs else None
            if o is None:
                continue
            chunk = Chunk(text=o.text, tokens=len(o.token_ids),
                          prompt_tokens=len(prompt_ids) if first else None)
            first = False
            if item.finished:
                finish = FINISH.get(str(o.finish_reason), "stop")
                self.last_request = request_metrics(item, len(prompt_ids))
            if chunk.text or chunk.tokens:
                yield chunk
            if not stopped and should_stop():
                stopped = True
                self.call(self.engine.abort(request_id), timeout=30)
                future.cancel()
        if stopped and finish in (None, "cancelled"):
            finish = "cancelled"
        yield Chunk(finish_reason=finish or "stop", prompt_tokens=len(prompt_ids) if first else None)

    def perplexity(self, ids: list[int]) -> float:
        """exp(mean negative log-likelihood) of ``ids`` from vLLM's prompt logprobs."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = f"moechat-ppl-{os.getpid()}-{next(self._ids)}"

        async def run() -> Any:
            final = None
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                final = out
            return final

        out = self.call(run(), timeout=STREAM_TIMEOUT_S)
        return perplexity_from_prompt_logprobs(ids, out.prompt_logprobs)

    def kv_cache_tokens(self) -> int | None:
        """Tokens the KV cache vLLM allocated holds (num_gpu_blocks x block_size), when the
        engine reports them to this process."""
        cache = getattr(getattr(self.engine, "vllm_config", None), "cache_config", None)
        blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
        return int(blocks) * int(size) if isinstance(blocks, int) and isinstance(size, int) else None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.scheduler.get("kv_cache_usage") is not None:
            out["kv_cache_usage"] = round(float(self.scheduler["kv_cache_usage"]), 4)
        for key in ("running_requests", "waiting_requests"):
            if self.scheduler.get(key) is not None:
                out[key] = self.scheduler[key]
        # vLLM's own numbers for the last request, flat so a stats table shows each on its row
        for key, value in self.last_request.items():
            if key in ("ttft_s", "decode_tok_s", "prefill_tok_s"):
                out[f"vllm_{key}"] = round(float(value), 4)
        return out

    def shutdown(self) -> None:
        """Stop the engine and its processes. (GPU memory is only certainly free once the worker
        process ends, which the manager does right after unload.)"""
        try:
            self.engine.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def perplexity_from_prompt_logprobs(ids: list[int], prompt_logprobs: Any) -> float:
    """Perplexity from vLLM's ``RequestOutput.prompt_logprobs``: one entry per prompt token, None
    for the first, else a dict token id -> Logprob (or float) that holds the actual token."""
    if not prompt_logprobs:
        raise BackendError("vLLM returned no prompt logprobs, so the text could not be scored.")
    total, count = 0.0, 0
    for token, entry in zip(ids[1:], list(prompt_logprobs)[1:]):
        if not entry or token not in entry:
            continue
        lp = entry[token]
        lp = getattr(lp, "logprob", lp)
        total -= float(lp)
        count += 1
    if not count:
        raise BackendError("vLLM's prompt logprobs did not include the prompt's own tokens.")
    mean = total / count
    return math.exp(mean) if mean < 700 else float("inf")


def request_metrics(out: Any, prompt_tokens: int) -> dict[str, Any]:
    """Time to first token and decode speed from a finished RequestOutput's ``metrics``
    (vLLM's RequestStateStats: engine-core timestamps and first_token_latency)."""
    m = getattr(out, "metrics", None)
    got: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                           "completion_tokens": sum(len(o.token_ids) for o in out.outputs) if out.outputs else 0}
    if m is None:
        return got
    ttft = getattr(m, "first_token_latency", None)
    if ttft:
        got["ttft_s"] = float(ttft)
    first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
    n = getattr(m, "num_generation_tokens", 0) or 0
    if first and last and last > first and n > 1:
        got["decode_tok_s"] = (n - 1) / (last - first)
        got["completion_tokens"] = n
    scheduled = getattr(m, "scheduled_ts", 0.0)
    if scheduled and first and first > scheduled:
        got["prefill_tok_s"] = prompt_tokens / (first - scheduled)
    return got
