#!/usr/bin/env python
"""Run both vLLM backends on a GPU machine that has vLLM, and write down what happened.

Run it with the app's Python, after `make vllm-env` (or with MOECHAT_VLLM_PYTHON set):

    .venv/bin/python scripts/vllm_gpu_check.py                       # tiny trained model, built here
    .venv/bin/python scripts/vllm_gpu_check.py --model /models/Qwen3-Next-80B-A3B-Instruct-FP8 \
        --offload-gb 40 --max-model-len 4096

What it does, each step recorded whether it passes or fails (nothing stops the run):
1. the machine, the vLLM environment and both probes;
2. vLLM's real signatures (AsyncEngineArgs, SamplingParams, RequestOutputKind, AsyncLLM, metrics)
   against the record in tests/test_vllm_engine_args.py, and every translated setting against them;
3. for vllm, vllm-offload (UVA, pinned and not) and vllm-offload (prefetch): load through the
   real BackendManager, a greedy reply, Stop mid-stream and the next reply, vLLM's stats, the
   output self-check, and GPU/host memory before load, after load and after unload;
4. the self-check on the same model with shuffled weights (it must fail);
5. in-process unload (vLLM in this process, no worker): GPU memory after shutdown while the
   process lives, and after it ends;
6. cancelling a load mid-start (the manager kills the worker): is the GPU freed, or does vLLM's
   engine process outlive the worker?
7. weight offload on vLLM itself, past moechat's version gate: the model without offload, with
   cpu_offload_gb (the runner vLLM picks, then the V2 runner forced): does the engine start, does
   the offload happen (KV cache blocks and host RAM against the baseline), and is the output the
   same (greedy tokens, perplexity of the self-check paragraph)?

--steps picks groups: signatures (2), offload (7), inprocess (5), backends (3, 4), cancel (6);
``engine`` is the first three, ``all`` (default) everything; step 1 always runs. On the lent GPU
machine ``engine`` and ``backends,cancel`` are one call each (scripts/vllm-gpu-run.sh).

It writes report.json and report.md into --out (default test-artifacts/vllm-gpu-check).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from moechat.backends import machine, selfcheck, synthetic  # noqa: E402
from moechat.backends.demo import build_selfcheck_models  # noqa: E402
from moechat.backends.manager import BackendManager  # noqa: E402
from moechat.backends.replies import chat, collect, stop_after  # noqa: E402
from moechat.backends.plugins import get_plugin_manager  # noqa: E402
from moechat.backends.vllm_ import (VllmOffloadSettings, VllmSettings, engine_env, engine_kwargs,  # noqa: E402
                                   interpreter_facts, is_hybrid, vllm_python)

SIGNATURES_SCRIPT = r"""
import dataclasses, inspect, json
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
out = {"vllm": vllm.__version__,
       "engine_args": {f.name: str(f.type) for f in dataclasses.fields(AsyncEngineArgs)},
       "request_output_kind": [k.name for k in RequestOutputKind],
       "async_llm": {m: list(inspect.signature(getattr(AsyncLLM, m)).parameters)
                     for m in ("from_engine_args", "generate", "abort", "shutdown")}}
fields = getattr(SamplingParams, "__struct_fields__", None)
out["sampling_params"] = list(fields) if fields else list(inspect.signature(SamplingParams).parameters)
try:
    from vllm.v1.metrics import stats
    out["request_state_stats"] = [f.name for f in dataclasses.fields(stats.RequestStateStats)]
    out["scheduler_stats"] = [f.name for f in dataclasses.fields(stats.SchedulerStats)]
except Exception as exc:
    out["stats_error"] = repr(exc)
import vllm.envs
out["env_vars"] = sorted(getattr(vllm.envs, "environment_variables", {}))
print("SIGNATURES " + json.dumps(out))
"""

IN_PROCESS_SCRIPT = r"""
import gc, json, os, subprocess, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
def used():
    q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True).stdout.split()
    return [int(x) * 2**20 for x in q]
out = {"before": used()}
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], gpu_memory_utilization=float(sys.argv[2]), enforce_eager=True, max_model_len=1024,
          gdn_prefill_backend="triton")  # FlashInfer's Hopper kernel needs nvidia-cutlass-dsl (docs/vllm.md)
out["text"] = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
out["loaded"] = used()
try:
    llm.llm_engine.engine_core.shutdown()
except Exception as exc:
    out["shutdown_error"] = repr(exc)
del llm
gc.collect()
import torch
torch.cuda.empty_cache()
out["after_unload_process_alive"] = used()
print("INPROCESS " + json.dumps(out))
"""


OFFLOAD_SCRIPT = r"""
import json, os, subprocess, sys, time
cfg = json.loads(sys.argv[1])
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its config and memory readable
os.environ.update(cfg.get("env", {}))
import psutil
def used():
    q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True).stdout.split()
    return [int(x) * 2**20 for x in q]
me = psutil.Process()
out = {"settings": cfg, "gpu_before": used(), "rss_before": me.memory_info().rss}
try:
    from vllm import LLM, SamplingParams
    started = time.time()
    llm = LLM(model=cfg["model"], gpu_memory_utilization=cfg["util"], enforce_eager=True,
              max_model_len=cfg["max_model_len"], max_num_seqs=4, cpu_offload_gb=cfg["offload_gb"],
              gdn_prefill_backend="triton")
    out["load_s"] = round(time.time() - started, 1)
except BaseException as exc:
    out["error"] = (type(exc).__name__ + ": " + str(exc))[:3000]
    print("OFFLOAD " + json.dumps(out), flush=True)
    raise SystemExit(0)
import torch
from transformers import AutoTokenizer
from moechat.backends.selfcheck import PARAGRAPH
from moechat.backends.vllm_engine import perplexity_from_prompt_logprobs
out["gpu_loaded"] = used()
out["rss_loaded"] = me.memory_info().rss
out["torch_allocated"] = torch.cuda.memory_allocated()
config = llm.llm_engine.vllm_config
out["num_gpu_blocks"] = getattr(config.cache_config, "num_gpu_blocks", None)
out["block_size"] = getattr(config.cache_config, "block_size", None)
try:
    out["v2_model_runner"] = bool(config.use_v2_model_runner)
except Exception as exc:
    out["v2_model_runner"] = repr(exc)
tok = AutoTokenizer.from_pretrained(cfg["model"])
prompt = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
started = time.time()
o = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0].outputs[0]
out["decode_tok_s"] = round(len(o.token_ids) / (time.time() - started), 2)
out["greedy_ids"] = list(o.token_ids)
out["text"] = o.text
ids = tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
p = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
out["perplexity"] = perplexity_from_prompt_logprobs(ids, p.prompt_logprobs)
print("OFFLOAD " + json.dumps(out), flush=True)
"""


STEP_GROUPS = {"all": {"signatures", "offload", "inprocess", "backends", "cancel"},
               "engine": {"signatures", "offload", "inprocess"}}


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": []}

    @contextlib.contextmanager
    def step(self, name: str):
        record: dict[str, Any] = {"step": name, "ok": None}
        started = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            yield record
            if record["ok"] is None:
                record["ok"] = True
        except Exception as exc:
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=8)
            print(f"    FAILED: {record['error']}", flush=True)
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.data["steps"].append(record)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        lines = [f"# vLLM GPU check, {self.data['started']}", ""]
        for key in ("machine", "vllm_env"):
            if key in self.data:
                lines += [f"- {key}: `{json.dumps(self.data[key], default=str)}`"]
        lines += ["", "| step | ok | seconds | what was seen |", "|---|---|---|---|"]
        for s in self.data["steps"]:
            seen = s.get("error") or s.get("summary") or ""
            lines.append(f"| {s['step']} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | {seen} |")
        (self.out / "report.md").write_text("\n".join(lines) + "\n")


def gpu_used() -> list[int]:
    return [g.used for g in machine.gpus()]


def recorded_signatures() -> Any:
    path = ROOT / "tests" / "test_vllm_engine_args.py"
    spec = importlib.util.spec_from_file_location("recorded_vllm_signatures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_signatures(report: Report, python: Path) -> None:
    with report.step("signatures: installed vLLM against the recorded ones") as r:
        out = subprocess.run([str(python), "-c", SIGNATURES_SCRIPT], capture_output=True, text=True, timeout=600)
        line = next((x for x in out.stdout.splitlines() if x.startswith("SIGNATURES ")), None)
        if line is None:
            raise RuntimeError(f"could not read vLLM's signatures: {out.stderr.strip()[-800:]}")
        real = json.loads(line.removeprefix("SIGNATURES "))
        rec = recorded_signatures()
        r["installed"] = real
        missing = {
            "engine_args": sorted(set(rec.ENGINE_ARGS) - set(real["engine_args"])),
            "sampling_params": sorted(set(rec.SAMPLING_PARAMS) - set(real["sampling_params"])),
            "request_output_kind": sorted(rec.REQUEST_OUTPUT_KIND - set(real["request_output_kind"])),
            "async_llm": {m: [p for p in ps if p not in real["async_llm"].get(m, [])]
                          for m, ps in rec.ASYNC_LLM_METHODS.items()},
            "request_state_stats": sorted(rec.REQUEST_STATE_STATS - set(real.get("request_state_stats", []))),
            "scheduler_stats": sorted(rec.SCHEDULER_STATS - set(real.get("scheduler_stats", []))),
            "env_vars": sorted(v for v in rec.ENV_VARS - set(real.get("env_vars", [])) if v.startswith("VLLM_")),
        }
        used = set()
        for s in rec.all_settings():
            used |= set(engine_kwargs(s, "/m"))
        missing["translated_settings"] = sorted(used - set(real["engine_args"]))
        r["recorded_but_not_installed"] = missing
        bad = {k: v for k, v in missing.items() if v and (not isinstance(v, dict) or any(v.values()))}
        r["ok"] = not bad
        r["summary"] = (f"vLLM {real['vllm']}: every recorded name exists" if not bad else
                        f"vLLM {real['vllm']}: recorded names missing from the installed vLLM: {bad}")


def run_backend(report: Report, name: str, settings: dict[str, Any], label: str) -> None:
    manager = BackendManager(get_plugin_manager(), Path(tempfile.mkdtemp(prefix="vllm-check-")))
    baseline = gpu_used()
    try:
        plan = None
        with report.step(f"{label}: load") as r:
            r["gpu_used_before"] = baseline
            plan = manager.check(name, settings).plan  # before the load: what the person sees first
            info = manager.load(name, settings)
            r["gpu_used_after_load"] = gpu_used()
            r["info"] = info
            r["summary"] = (f"loaded in {info.get('load_time_s', 0):.1f} s, vLLM {info.get('vllm_version')}, "
                            f"warnings: {info.get('warnings') or 'none'}"
                            + (f", self-check: {info['selfcheck']['message']}" if info.get("selfcheck") else ""))
        if manager.state.status != "ready":
            return
        with report.step(f"{label}: memory plan against measured GPU memory") as r:
            growth = manager.state.info.get("memory_after_load", {})
            r["plan"] = {"items": [dataclasses.asdict(i) for i in plan.items], "gpu_bytes": plan.gpu_bytes,
                         "host_bytes": plan.host_bytes, "gpu_available": plan.gpu_available} if plan else None
            r["measured"] = growth
            r["gpu_used_before_load"], r["gpu_used_after_load"] = baseline, gpu_used()
            measured = sum(r["gpu_used_after_load"]) - sum(baseline)
            r["ok"] = plan is not None and measured > 0
            r["summary"] = (f"plan: {plan.gpu_bytes / 2**30:.2f} GiB on the GPU ("
                            + ", ".join(f"{i.what} {i.bytes / 2**30:.2f}" for i in plan.items if i.device == "gpu")
                            + f"); vLLM reserved {plan.gpu_available / 2**30 if plan.gpu_available else 0:.1f} GiB by "
                            f"gpu_memory_utilization; measured: {measured / 2**30:.2f} GiB more GPU memory used "
                            f"(nvidia-smi), KV cache {growth.get('kv_cache_tokens')} tokens" if plan else "no plan")
        with report.step(f"{label}: stats while a reply streams") as r:
            gen = manager.generate(chat("Count from one to a hundred in words.", temperature=0, max_new_tokens=200))
            seen, during = 0, None
            for ev in gen:
                if ev.kind == "chunk":
                    seen += 1
                    if seen == 5 and during is None:
                        during = manager.stats()
            r["stats_during_reply"] = during
            bs = (during or {}).get("backend_stats", {})
            r["ok"] = bool(during) and (bs.get("running_requests") or 0) >= 1
            r["summary"] = (f"after 5 chunks: running_requests {bs.get('running_requests')}, kv_cache_usage "
                            f"{bs.get('kv_cache_usage')}; the reply went on to {seen} chunks")
        with report.step(f"{label}: greedy reply") as r:
            text, done = collect(manager.generate(chat("What is the capital of France?", temperature=0,
                                                       max_new_tokens=32)))
            r.update(text=text, finish_reason=done.finish_reason, usage=done.usage, error=done.error)
            r["ok"] = done.finish_reason in ("stop", "length") and bool(text)
            r["summary"] = f"{text[:80]!r}, {done.finish_reason}, {done.usage.get('decode_tok_s')} tok/s"
        with report.step(f"{label}: Stop mid-stream, then the next reply") as r:
            chunks, last = stop_after(manager.generate(chat("Write a long story about the sea. " * 3,
                                                            temperature=0.8, max_new_tokens=400)), 3)
            text, after = collect(manager.generate(chat("Hello", temperature=0, max_new_tokens=8)))
            r.update(chunks_before_stop=chunks, finish_reason=last.finish_reason, next_reply=text,
                     next_finish=after.finish_reason)
            r["ok"] = last.finish_reason == "cancelled" and after.finish_reason in ("stop", "length")
            r["summary"] = f"stopped: {last.finish_reason} after {chunks} chunks; next reply {after.finish_reason}"
        with report.step(f"{label}: stats") as r:
            stats = manager.stats()
            r["stats"] = stats
            bs = stats.get("backend_stats", {})
            r["ok"] = "kv_cache_usage" in bs and "vllm_ttft_s" in bs
            r["summary"] = (f"kv_cache_usage {bs.get('kv_cache_usage')}, vLLM's time to first token "
                            f"{bs.get('vllm_ttft_s')} s, decode {bs.get('vllm_decode_tok_s')} tok/s")
        # a checkpoint written with random weights (moechat.backends.fp8_checkpoint) is garbage by
        # design: there the self-check passes when it says so
        random_weights = synthetic.written_from(settings["model"]) is not None
        with report.step(f"{label}: output self-check"
                         + (" (random weights: it must fail)" if random_weights else "")) as r:
            result = selfcheck.check_loaded(manager)
            r["selfcheck"] = result.to_dict()
            r["ok"] = result.passed is (not random_weights)
            r["summary"] = result.message
    finally:
        if manager.state.status != "ready":
            manager.close()
            return
        with report.step(f"{label}: unload frees the GPU") as r:
            before = gpu_used()
            manager.unload()
            time.sleep(2)
            r.update(gpu_used_before_load=baseline, gpu_used_before_unload=before, gpu_used_after_unload=gpu_used(),
                     memory_log=manager.memory_log)
            left = sum(r["gpu_used_after_unload"]) - sum(baseline)
            r["ok"] = left < 512 * 2**20
            r["left_after_unload_bytes"] = left
            r["summary"] = (f"GPU used {sum(before) / 2**20:.0f} MiB loaded -> {sum(r['gpu_used_after_unload']) / 2**20:.0f}"
                            f" MiB after unload ({left / 2**20:.0f} MiB above the level before load; worker exited:"
                            f" {manager.memory_log.get('worker_exited')})")
        manager.close()


def run_scrambled(report: Report, name: str, settings: dict[str, Any]) -> None:
    manager = BackendManager(get_plugin_manager(), Path(tempfile.mkdtemp(prefix="vllm-check-")))
    try:
        with report.step(f"{name} on shuffled weights: the self-check must fail") as r:
            info = manager.load(name, settings)
            result = selfcheck.check_loaded(manager)
            r.update(info=info, selfcheck=result.to_dict())
            r["ok"] = result.passed is False and (name != "vllm-offload" or info.get("wrong_output") is True)
            r["summary"] = result.message
    finally:
        manager.close()


def compute_apps() -> list[dict[str, int]]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [{"pid": int(a), "used_mib": int(b)} for a, b in (line.split(",") for line in out.strip().splitlines())]


def cancel_mid_load(report: Report, name: str, settings: dict[str, Any]) -> None:
    """Cancel a load while vLLM starts: the manager kills the worker (SIGKILL). Does vLLM's engine
    process, the worker's child, let go of the GPU too, or is it left behind?"""
    import threading
    manager = BackendManager(get_plugin_manager(), Path(tempfile.mkdtemp(prefix="vllm-check-")))
    with report.step(f"{name}: cancel while loading, then GPU memory and leftover processes") as r:
        baseline = gpu_used()
        errors: list[str] = []
        t = threading.Thread(target=lambda: errors.append(_load_quietly(manager, name, settings)), daemon=True)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and t.is_alive():
            stage = manager.state.progress.stage if manager.state.progress else ""
            if stage.startswith("Starting vLLM"):
                break
            time.sleep(0.2)
        if not t.is_alive():
            raise RuntimeError(f"the load ended before it could be cancelled: {errors}")
        # cancel once vLLM's engine process holds GPU memory (on 2026-12-06 a fixed 10 s wait cancelled
        # before it had any: docs/runs/vllm-gpu-check-20261206c-H100/README.md)
        during = gpu_used()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and t.is_alive() and sum(during) - sum(baseline) < 256 * 2**20:
            time.sleep(0.5)
            during = gpu_used()
        if not t.is_alive():
            raise RuntimeError(f"the load ended before it could be cancelled: {errors}")
        manager.cancel_load()
        t.join(60)
        samples = []
        for _ in range(30):
            time.sleep(1)
            samples.append(sum(gpu_used()))
        left = samples[-1] - sum(baseline)
        r.update(gpu_used_before=baseline, gpu_used_during_load=during, load_result=errors,
                 gpu_used_after_cancel=samples, leftover_compute_apps=compute_apps())
        r["ok"] = left < 512 * 2**20 and not r["leftover_compute_apps"]
        r["summary"] = (f"cancelled with {(sum(during) - sum(baseline)) / 2**20:.0f} MiB of GPU memory taken; "
                        f"{left / 2**20:.0f} MiB above the level before load 30 s after cancelling; GPU processes "
                        f"left: {r['leftover_compute_apps'] or 'none'}")
    manager.close()


def _load_quietly(manager: BackendManager, name: str, settings: dict[str, Any]) -> str:
    try:
        manager.load(name, settings)
        return "loaded"
    except Exception as exc:
        return str(exc)


def in_process_unload(report: Report, python: Path, model: str, util: float) -> None:
    with report.step("in-process unload (no worker): GPU memory while the process lives and after") as r:
        proc = subprocess.run([str(python), "-c", IN_PROCESS_SCRIPT, model, str(util)], capture_output=True,
                              text=True, timeout=900)
        time.sleep(2)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("INPROCESS ")), None)
        if line is None:
            raise RuntimeError(f"the in-process run failed: {proc.stderr.strip()[-800:]}")
        got = json.loads(line.removeprefix("INPROCESS "))
        got["after_process_exit"] = gpu_used()
        r.update(got)
        leaked = sum(got["after_unload_process_alive"]) - sum(got["before"])
        freed = sum(got["after_process_exit"]) - sum(got["before"])
        r["summary"] = (f"after shutdown, process alive: {leaked / 2**20:.0f} MiB still used; after the process "
                        f"ended: {freed / 2**20:.0f} MiB")


def run_offload_engine(python: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([str(python), "-c", OFFLOAD_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=900)
    time.sleep(2)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("OFFLOAD ")), None)
    if line is None:
        return {"settings": cfg, "error": f"the engine process died (exit {proc.returncode}): "
                                          f"{proc.stderr.strip()[-1500:]}"}
    got = json.loads(line.removeprefix("OFFLOAD "))
    got["gpu_after_exit"] = gpu_used()
    return got


def offload_verdict(base: dict[str, Any], run: dict[str, Any], offload_bytes: int) -> dict[str, Any]:
    """Did the offload happen (more KV cache blocks on the GPU, more host RAM), and is the output
    the baseline's (the same greedy tokens, the same perplexity within 2 %)?"""
    if "error" in run:
        return {"started": False, "error": run["error"]}
    out: dict[str, Any] = {"started": True, "v2_model_runner": run.get("v2_model_runner")}
    host = run["rss_loaded"] - run["rss_before"] - (base.get("rss_loaded", 0) - base.get("rss_before", 0))
    out["host_ram_above_baseline_bytes"] = host
    if base.get("num_gpu_blocks") and run.get("num_gpu_blocks"):
        out["kv_blocks_baseline"], out["kv_blocks_offload"] = base["num_gpu_blocks"], run["num_gpu_blocks"]
        # the KV cache grows by the freed GPU memory: blocks x bytes per block, with bytes per block
        # from the baseline's torch allocation being weights + KV cache (not separable here), so
        # only the direction and the host RAM are judged
    if "torch_allocated" in base and "torch_allocated" in run:
        out["torch_allocated_baseline"], out["torch_allocated_offload"] = base["torch_allocated"], run["torch_allocated"]
    out["offload_happened"] = (host >= offload_bytes * 0.5
                               and (run.get("num_gpu_blocks") or 0) > (base.get("num_gpu_blocks") or 0))
    out["same_greedy_tokens"] = run.get("greedy_ids") == base.get("greedy_ids")
    pb, pr = base.get("perplexity"), run.get("perplexity")
    out["perplexity_baseline"], out["perplexity_offload"] = pb, pr
    out["same_perplexity"] = bool(pb and pr and abs(pr / pb - 1) < 0.02)
    out["decode_tok_s_baseline"], out["decode_tok_s_offload"] = base.get("decode_tok_s"), run.get("decode_tok_s")
    return out


def offload_experiment(report: Report, python: Path, model: str, util: float, max_model_len: int,
                       offload_gb: float) -> None:
    """Weight offload on vLLM itself (no moechat gate in the way), on ``model``."""
    common = {"model": model, "util": util, "max_model_len": max_model_len}
    base: dict[str, Any] = {"error": "the baseline did not run"}
    with report.step("vLLM alone, no offload (the baseline)") as r:
        base = run_offload_engine(python, dict(common, offload_gb=0))
        r["run"] = base
        r["ok"] = "error" not in base
        r["summary"] = base.get("error") or (f"started in {base.get('load_s')} s, {base.get('num_gpu_blocks')} KV "
                                             f"blocks, V2 runner {base.get('v2_model_runner')}, perplexity "
                                             f"{base.get('perplexity')}, {base.get('decode_tok_s')} tok/s")
    config = json.loads((Path(model) / "config.json").read_text())
    hybrid = is_hybrid(config)
    for label, env in (("the runner vLLM picks", {}), ("the V2 model runner forced", {"VLLM_USE_V2_MODEL_RUNNER": "1"})):
        with report.step(f"vLLM alone, cpu_offload_gb {offload_gb:g}, {label}"
                         + (" (hybrid model)" if hybrid else "")) as r:
            run = run_offload_engine(python, dict(common, offload_gb=offload_gb, env=env))
            r["run"] = run
            verdict = offload_verdict(base, run, int(offload_gb * 2**30))
            r["verdict"] = verdict
            r["ok"] = bool(verdict.get("started") and verdict.get("offload_happened") and verdict.get("same_greedy_tokens"))
            r["summary"] = (f"did not start: {verdict['error'][:300]}" if not verdict["started"] else
                            f"offload happened: {verdict['offload_happened']} (host RAM +"
                            f"{verdict['host_ram_above_baseline_bytes'] / 2**30:.1f} GiB, KV blocks "
                            f"{verdict.get('kv_blocks_baseline')} -> {verdict.get('kv_blocks_offload')}), same greedy "
                            f"tokens: {verdict['same_greedy_tokens']}, perplexity {verdict['perplexity_baseline']} -> "
                            f"{verdict['perplexity_offload']}, V2 runner {verdict['v2_model_runner']}, "
                            f"{verdict['decode_tok_s_offload']} tok/s")


def main(argv: list[str] | None = None) -> int:
    # the direct starts (LLM(...) in a child process) get the backends' DeepGEMM default too
    os.environ.setdefault("VLLM_USE_DEEP_GEMM", engine_env(VllmSettings())["VLLM_USE_DEEP_GEMM"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder for both backends (default: a tiny trained model built here)")
    parser.add_argument("--offload-gb", type=float, default=None,
                        help="cpu_offload_gb for vllm-offload (default: a third of the weights)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--out", default=str(ROOT / "test-artifacts" / "vllm-gpu-check"))
    parser.add_argument("--steps", default="all",
                        help="comma-separated groups: signatures, offload (vLLM's own weight offload), inprocess "
                             "(in-process unload), backends (through moechat's manager), cancel (cancel while "
                             "loading); engine = signatures,offload,inprocess; all = everything")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture CUDA graphs (slower to load; default: enforce_eager, to save GPU time)")
    args = parser.parse_args(argv)
    groups = set()
    for g in args.steps.split(","):
        groups |= STEP_GROUPS.get(g.strip(), {g.strip()})
    unknown = groups - STEP_GROUPS["all"]
    if unknown:
        parser.error(f"unknown --steps {', '.join(sorted(unknown))}; known: {', '.join(sorted(STEP_GROUPS))}, "
                     f"{', '.join(sorted(STEP_GROUPS['all']))}")
    report = Report(Path(args.out))
    python, source = vllm_python()

    with report.step("machine and vLLM environment") as r:
        m = machine.this_machine()
        report.data["machine"] = {"gpus": [dataclasses.asdict(g) for g in m.gpus], "host_total": m.host_total,
                                  "cpus": m.cpu_count}
        probes = {n: get_plugin_manager().backend(n).probe() for n in ("vllm", "vllm-offload")}
        report.data["vllm_env"] = {"python": str(python), "chosen_by": source}
        report.data["vllm_env"].update(interpreter_facts(python) if python.exists() else {"exists": False})
        r["probes"] = {n: dataclasses.asdict(p) for n, p in probes.items()}
        r["ok"] = all(p.available for p in probes.values())
        r["summary"] = "both available" if r["ok"] else probes["vllm"].reason
    if "signatures" in groups:
        check_signatures(report, python)

    scratch = Path(tempfile.mkdtemp(prefix="vllm-check-models-"))
    scrambled = None
    if args.model:
        model = Path(args.model)
    else:
        with report.step("build a tiny model trained on the self-check paragraph") as r:
            model, scrambled = build_selfcheck_models(scratch, steps=200)
            r["summary"] = f"{model.name} and {scrambled.name}"
    weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    offload_gb = args.offload_gb if args.offload_gb is not None else max(weights / 3 / 2**30, 0.001)
    common = {"model": str(model), "max_model_len": args.max_model_len,
              "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": not args.cuda_graphs}
    VllmSettings.model_validate(common)

    if "offload" in groups:
        offload_experiment(report, python, str(model), args.gpu_memory_utilization, args.max_model_len, offload_gb)
    if "inprocess" in groups:
        in_process_unload(report, python, str(model), args.gpu_memory_utilization)
    if "backends" in groups:
        run_backends(report, common, offload_gb, scrambled)
    if "cancel" in groups:
        cancel_mid_load(report, "vllm", dict(common))
    VllmOffloadSettings.model_validate(dict(common, cpu_offload_gb=offload_gb))
    shutil.rmtree(scratch, ignore_errors=True)
    failed = [s["step"] for s in report.data["steps"] if not s["ok"]]
    print(f"\nwrote {report.out / 'report.md'}; {len(failed)} step(s) failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


def run_backends(report: Report, common: dict[str, Any], offload_gb: float, scrambled: Path | None) -> None:
    run_backend(report, "vllm", dict(common), "vllm")
    run_backend(report, "vllm-offload", dict(common, cpu_offload_gb=offload_gb, pin_memory=True),
                f"vllm-offload uva {offload_gb:.3g} GiB pinned")
    run_backend(report, "vllm-offload", dict(common, cpu_offload_gb=offload_gb, pin_memory=False),
                f"vllm-offload uva {offload_gb:.3g} GiB not pinned")
    run_backend(report, "vllm-offload", dict(common, offload_backend="prefetch", offload_group_size=2,
                                             offload_num_in_group=1), "vllm-offload prefetch 1 of 2 layers")
    if scrambled is not None:
        run_scrambled(report, "vllm-offload", dict(common, model=str(scrambled), cpu_offload_gb=offload_gb))


if __name__ == "__main__":
    sys.exit(main())
