"""``moechat bench``: measure a backend the same way as every other one.

Loads through the real BackendManager and worker process, then runs ``--warmup`` warm-ups and
``--repeat`` generations of ``--gen-tokens`` tokens after a ``--prompt-tokens`` prompt, and
reports load time, time to first token, prefill and decode speed (median, min, max), peak GPU
memory (torch's peak allocation in the worker), peak host memory of the worker and the processes
it started (their VmHWM), every stat the backend reports, the card, the CPU, this machine's
measured bandwidths, the date and the git commit. ``--json FILE`` writes all of it in the one benchmark schema
(moechat.backends.benchmark, kind "product"; docs/benchmarks.md).

``--model synthetic:qwen3-next-80b-a3b --layers N`` benchmarks the full widths at N layers and
extrapolates to the full depth (time per token scales with the layers; it says so).
``--vram-budget-gb G`` makes the worker behave like a G GiB card: torch's per-process memory
cap is enforced in the worker, and budget-sized settings of the backend are derived from it.
With fewer layers than the model has, the part of the budget that scales with depth is
scaled too (moechat.backends.benchmark.scaled_budget, the one formula; docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(p) -> None:
    p.add_argument("--backend", required=True, help="backend to measure (see `moechat plugins`)")
    p.add_argument("--model", default="", help="model folder, or synthetic:qwen3-next-80b-a3b / synthetic:tiny "
                                               "(empty: the demo model)")
    p.add_argument("--layers", type=int, default=None,
                   help="synthetic models only: keep every width, cut the depth to N layers")
    p.add_argument("--vram-budget-gb", type=float, default=None,
                   help="behave like a card with this many GiB (the cap is enforced in the worker)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens to generate per run (default 32)")
    p.add_argument("--repeat", type=int, default=3, help="measured runs after the warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1; 0 for very slow backends)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend setting (repeatable)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--force", action="store_true", help="load even when the memory plan says it does not fit")
    p.add_argument("--bandwidth-mb", type=int, default=256,
                   help="buffer size for the bandwidth measurement (0: skip it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--note", dest="notes", action="append", default=[], metavar="TEXT",
                   help="a sentence about the run, kept in the result's notes (repeatable)")


# ---- facts about the worker -------------------------------------------------------------------

def peak_rss(pid: int | None) -> int | None:
    """The most resident memory ``pid`` has had (``machine.peak_rss``), plus the same for each
    process it has started that is still running: vLLM's engine core and llama.cpp's server hold
    the model in a child of the worker (vLLM's front end alone held 1.08 GB on the H100 while its
    engine held the weights). Each process at its own peak: an upper bound of the peak of them
    together."""
    if pid is None:
        return None
    import psutil

    from moechat.backends.machine import peak_rss as one

    try:
        children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        children = []
    total = sum(one(p) or 0 for p in (pid, *children))
    return total or None


def gpu_peak(gpus: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """Peak GPU bytes and where the number comes from, from a backend's ``gpus`` stats: torch's
    peak allocation in the worker; where the worker holds no CUDA context (vLLM's front end), what
    nvidia-smi shows in use at the end (the engine's memory, all of the card's users)."""
    if any("peak_allocated_bytes" in g for g in gpus):
        return max(g.get("peak_allocated_bytes") or 0 for g in gpus), "torch peak allocated"
    if gpus:
        return max(g.get("used_bytes") or 0 for g in gpus), "nvidia-smi used at the end"
    return None, None


# ---- the prompt ---------------------------------------------------------------------------------

def prompt_text(model_path: str, tokens: int) -> str:
    """Text of about ``tokens`` tokens for the model's tokenizer (cut exactly when the
    ``tokenizers`` library can read it; the runs record the real count)."""
    from moechat.backends.demo import CORPUS
    from moechat.backends.synthetic import tokenizer_folder

    words = CORPUS.split()
    text = " ".join(words[i % len(words)] for i in range(tokens * 2))
    try:
        from tokenizers import Tokenizer
        folder = tokenizer_folder(model_path) if model_path else ""
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        ids = tok.encode(text, add_special_tokens=False).ids[:tokens]
        return tok.decode(ids)
    except Exception:  # no tokenizer.json here: a word is about one token
        return " ".join(text.split()[:tokens])


# ---- settings derived from the budget -----------------------------------------------------------

def derive_settings(entry: Any, model: Any, given: dict[str, Any], budget_gib: float | None,
                    context: int, card: tuple[float, int, int] | None = None) -> dict[str, Any]:
    """Settings the person did not give, sized for the benchmark: a context just long enough, and
    for a VRAM budget the backend's own knobs (vram_budget_gb, gpu_memory_gb + cpu_memory_gb,
    gpu_memory_utilization), so the backend plans for the budget rather than the whole card. A
    backend that splits the model by whole layers (``gpu_layers``) gets the most its plan fits;
    ``card`` = (the card's GiB, layers, full layers) for a model cut in depth: see gpu_layers_within."""
    from moechat.backends.machine import this_machine
    from moechat.backends.planning import effective_machine

    fields = entry.cls.Settings.model_fields
    out = dict(given)
    for name in ("max_context", "max_model_len"):
        if name in fields and name not in out:
            out[name] = context
    m = effective_machine(this_machine())
    if budget_gib is None or not m.gpus:
        return out
    if "vram_budget_gb" in fields and "vram_budget_gb" not in out:
        out["vram_budget_gb"] = round(budget_gib, 3)
    if "gpu_memory_utilization" in fields and "gpu_memory_utilization" not in out:
        total = this_machine().gpus[0].total
        out["gpu_memory_utilization"] = round(min(0.95, budget_gib * 1024**3 / total), 4)
    if "gpu_layers" in fields and "gpu_layers" not in out and getattr(model, "num_layers", None):
        from dataclasses import replace
        card_gib, layers, full = card if card else (budget_gib, 1, 1)
        whole = replace(m, gpus=[replace(g, total=int(card_gib * 1024**3), used=0) for g in m.gpus])
        out["gpu_layers"] = gpu_layers_within(entry.cls, model, out, whole, full / layers)
    if "gpu_memory_gb" in fields and "gpu_memory_gb" not in out:
        settings = entry.cls.Settings.model_validate(out)
        plan = entry.cls.plan(model, settings, m)
        runtime = sum(i.bytes for i in plan.items if i.device == "gpu" and "weights" not in i.what) if plan else 0
        out["gpu_memory_gb"] = round(max(0.5, (budget_gib * 1024**3 - runtime) / 1e9 * 0.95), 3)
        if "cpu_memory_gb" in fields and "cpu_memory_gb" not in out:
            out["cpu_memory_gb"] = round(0.9 * m.host_available / 1e9, 1)
    return out


def gpu_layers_within(cls: Any, model: Any, settings: dict[str, Any], machine: Any, depth: float = 1.0) -> int:
    """``gpu_layers`` for a backend that splits the model by whole layers the way llama.cpp's
    n_gpu_layers does (the output layer counted first, then blocks from the end), by its own plan
    on ``machine``'s GPU: -1 (all) when everything fits, else the most that do; the rest stays on
    the CPU. For a model cut to 1/``depth`` of its blocks, ``machine`` is the whole card: the plan's
    bytes per block (the line through 1 and all but the output layer) and its part that does not
    grow with depth (output layer, logits, buffers) say how many of the full model's blocks the
    card holds, and the cut model gets the same share of its blocks, rounded down, so that it never
    stands for more than the card holds (the scaled budget of the other backends would hand it the
    fixed part of a budget reserved for embeddings that llama.cpp keeps on the CPU)."""
    def gpu_bytes(n: int) -> int | None:
        plan = cls.plan(model, cls.Settings.model_validate(dict(settings, gpu_layers=n)), machine)
        return None if plan is None or plan.gpu_available is None else plan.gpu_bytes

    layers = model.num_layers
    available = machine.gpus[0].total - machine.gpus[0].used if machine.gpus else None
    if depth > 1 and layers > 1 and available is not None and gpu_bytes(1) is not None:
        output, most = gpu_bytes(1), gpu_bytes(layers)  # the output layer alone; it and layers - 1 blocks
        per_block = (most - output) / (layers - 1)
        if gpu_bytes(-1) + per_block * layers * (depth - 1) <= available:
            return -1
        if output > available:
            return 0
        blocks = int((available - output) // (per_block * depth)) if per_block > 0 else layers
        return min(1 + blocks, layers)  # layers + 1 (all) did not fit
    for n in (-1, *range(layers, 0, -1)):
        used = gpu_bytes(n)
        if used is None or used <= available:
            return n
    return 0


# ---- the run ------------------------------------------------------------------------------------

class Bar:
    """A one-line progress bar on stderr (tqdm), quiet when asked."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.shown = 0.0
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=1.0, file=sys.stderr, bar_format="{desc} |{bar}| {percentage:3.0f}%",
                            dynamic_ncols=True)

    def show(self, desc: str, fraction: float | None = None) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if desc == self.bar.desc and now - self.shown < 0.5 and fraction != 1.0:
            return  # at most two redraws a second within one stage
        self.shown = now
        self.bar.set_description_str(desc[:60], refresh=False)
        if fraction is not None:
            self.bar.n = max(0.0, min(1.0, fraction))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _depth(args) -> tuple[str, int | None, int | None]:
    """The model spec with --layers applied, its layers and the model's full depth."""
    from moechat.backends import synthetic
    from moechat.backends.api import BackendError

    model_spec = args.model
    if args.layers is not None:
        if not synthetic.is_synthetic(model_spec):
            raise BackendError("--layers works only with synthetic models (--model synthetic:NAME).")
        model_spec = str(synthetic.Spec(synthetic.parse(model_spec).name, args.layers))
    if synthetic.is_synthetic(model_spec):
        spec = synthetic.parse(model_spec)
        full = synthetic.full_layers(spec)
        return model_spec, spec.layers or full, full
    written = synthetic.written_from(model_spec) if model_spec else None
    if written is not None:  # a checkpoint folder written from a synthetic spec: extrapolate it too
        full = synthetic.full_layers(written)
        return model_spec, written.layers or full, full
    return model_spec, None, None


def shaped_model(model: Any, model_spec: str) -> Any:
    """``model``, or where its shapes cannot be read from its config (a GGUF) but it was written from
    a synthetic spec, that spec's model: the budget of a folder stands for the same card either way."""
    from moechat.backends import synthetic
    from moechat.backends.shapes import try_shapes

    spec = synthetic.written_from(model_spec) if model_spec and not synthetic.is_synthetic(model_spec) else None
    return synthetic.model_info(str(spec)) if spec and try_shapes(model.config) is None else model


def asked(args) -> dict[str, Any]:
    """The run's settings as the person gave them."""
    names = {"backend": "backend", "model": "model", "layers": "layers", "vram_budget_gb": "vram_budget_gb",
             "prompt_tokens": "prompt_tokens", "gen_tokens": "gen_tokens", "repeat": "repeat", "warmup": "warmup",
             "set": "settings", "force": "force", "bandwidth_mb": "bandwidth_mb"}
    return {key: getattr(args, attr, None) for key, attr in names.items()}


def case_name(backend: str, budget: float | None) -> str:
    return f"{backend} at {budget:g} GB" if budget else backend


def measure(args):
    """Run the benchmark described by ``args``: a validated benchmark Result (kind "product");
    raises BackendError with a sentence."""
    from moechat.backends import benchmark
    from moechat.backends.api import BackendError, GenerateRequest, SamplingParams
    from moechat.backends.manager import BackendManager
    from moechat.backends.planning import VRAM_BUDGET_ENV, to_dict
    from moechat.backends.plugins import get_plugin_manager
    from moechat.webui.cli import parse_settings

    model_spec, layers, full_layers = _depth(args)
    for name, value in (("--prompt-tokens", args.prompt_tokens), ("--gen-tokens", args.gen_tokens),
                        ("--repeat", args.repeat)):
        if value < 1:
            raise BackendError(f"{name} must be at least 1.")
    if args.warmup < 0:
        raise BackendError("--warmup must be 0 or more.")

    manager = BackendManager(get_plugin_manager())
    given = parse_settings(args.settings)
    given["model"] = model_spec
    try:
        # the person's settings first (the backend, the settings, the model folder: a sentence for each
        # mistake before anything is measured); the settings sized below are checked once more, and
        # that check is the load's
        first = manager.check(args.backend, given)
        entry = first.entry
        model = first.model if first.model is not None else manager.resolve_model(model_spec)
        budget = None
        if args.vram_budget_gb is not None:
            budget = benchmark.scaled_budget(args.vram_budget_gb, shaped_model(model, model_spec), layers,
                                             full_layers)
            os.environ[VRAM_BUDGET_ENV] = f"{budget:.4f}"
        context = args.prompt_tokens + args.gen_tokens + 64
        card = (args.vram_budget_gb, layers, full_layers) if args.vram_budget_gb and layers and full_layers else None
        settings = derive_settings(entry, model, given, budget, context, card)
        checked = manager.check(args.backend, settings)
    except BaseException:
        manager.close()
        raise

    bar = Bar(args.no_progress)
    steps = args.repeat + args.warmup + 1  # load, warm-ups, runs

    stages: list[tuple[float, str]] = []   # (when, stage) at each change of the load's stage

    def on_progress(p) -> None:
        frac = (p.done / p.total) if p.total else 0.0
        bar.show(f"load: {p.stage}", frac / steps)
        if not stages or stages[-1][1] != p.stage:
            stages.append((time.perf_counter(), p.stage))

    try:
        bar.show("measuring bandwidth", 0.0)
        facts = benchmark.machine_facts(args.bandwidth_mb)
        started = time.perf_counter()
        info = manager.load(args.backend, settings, on_progress=on_progress, force=args.force, checked=checked)
        load_wall = time.perf_counter() - started
        load_stages = stage_times(stages, started + load_wall)
        from moechat.backends.machine import process_rss
        worker = manager.stats().get("worker_pid")
        rss_after_load = process_rss(worker) if worker else None
        text = prompt_text(model_spec, args.prompt_tokens)
        runs: list[dict[str, Any]] = []
        for i in range(args.warmup + args.repeat):
            warmup = i < args.warmup
            bar.show("warm-up" if warmup else f"run {i - args.warmup + 1} of {args.repeat}", (1 + i) / steps)
            request = GenerateRequest(prompt=text, sampling=SamplingParams(
                temperature=0.0, max_new_tokens=args.gen_tokens, seed=0))
            usage, error = {}, None
            for ev in manager.generate(request):
                if ev.kind == "done":
                    usage, error = ev.usage, ev.error
            if error:
                raise BackendError(f"Generation failed: {error}")
            runs.append(dict(usage, warmup=warmup))
        bar.show("done", 1.0)
        stats = manager.stats()
        backend_stats = stats.get("backend_stats", {})
        pid = stats.get("worker_pid")
        peak_host = peak_rss(pid)
        state = manager.state
    finally:
        bar.close()
        manager.close()

    measured = [r for r in runs if not r["warmup"]]
    peak_gpu, peak_gpu_source = gpu_peak(backend_stats.get("gpus") or info.get("gpus") or [])
    decode = benchmark.spread([r.get("decode_tok_s") for r in measured])
    prefill = benchmark.spread([r.get("prefill_tok_s") for r in measured])
    ttft = benchmark.spread([r.get("ttft_s") for r in measured])
    plan_check = state.info.get("plan_check")
    case = {
        "name": case_name(args.backend, args.vram_budget_gb),
        "backend": args.backend, "model": model_spec, "layers": layers, "full_layers": full_layers,
        "vram_budget_gb": args.vram_budget_gb,
        "vram_budget_applied_gb": round(budget, 3) if budget is not None else None,
        "prompt_tokens": benchmark.spread([r.get("prompt_tokens") for r in measured])["median"],
        "completion_tokens": benchmark.spread([r.get("completion_tokens") for r in measured])["median"],
        "load_time_s": info.get("load_time_s"),
        "ttft_s": ttft, "prefill_tok_s": prefill, "decode_tok_s": decode,
        "peak_gpu_bytes": peak_gpu, "peak_gpu_source": peak_gpu_source, "peak_host_bytes": peak_host,
        "backend_stats": backend_stats,
        "extrapolated": benchmark.extrapolate(decode["median"], prefill["median"], ttft["median"], layers,
                                              full_layers),
        "notes": [plan_check] if plan_check else [],
        "detail": {"model_summary": model.summary(), "load_wall_s": load_wall, "settings": state.settings,
                   "load_info": state.info, "plan": to_dict(state.plan) if state.plan is not None else None,
                   "load_stages": load_stages, "host_rss_after_load_bytes": rss_after_load, "runs": runs},
    }
    return benchmark.result(benchmark.run_info("product", "moechat bench", facts), asked(args), [case],
                            notes=list(getattr(args, "notes", None) or []))


def stage_times(stages: list[tuple[float, str]], end: float) -> list[dict[str, Any]]:
    """Seconds spent in each stage of a load, from the (time, stage) of each change of stage."""
    bounds = [t for t, _ in stages[1:]] + [end]
    return [{"stage": stage, "s": round(stop - start, 3)} for (start, stage), stop in zip(stages, bounds)]


def summary(result) -> str:
    def num(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    c, m = result.cases[0], result.run.machine
    gpus = ", ".join(g.name for g in m.gpus) or "no GPU"
    lines = [
        f"{c.backend} on {c.model} ({gpus}; {m.cpu or '?'})",
        f"load {num(c.load_time_s, '{:.1f}')} s; prompt {num(c.prompt_tokens, '{:.0f}')} tokens, "
        f"{num(c.completion_tokens, '{:.0f}')} generated, {len(c.decode_tok_s.values)} runs",
        f"time to first token {num(c.ttft_s.median, '{:.3f}')} s; "
        f"prefill {num(c.prefill_tok_s.median, '{:.1f}')} tok/s; "
        f"decode {num(c.decode_tok_s.median)} tok/s "
        f"(min {num(c.decode_tok_s.min)}, max {num(c.decode_tok_s.max)})",
        f"peak GPU {num(c.peak_gpu_bytes / 1e9 if c.peak_gpu_bytes is not None else None, '{:.2f}')} GB; "
        f"peak host RSS (the worker and its processes) {num((c.peak_host_bytes or 0) / 1e9, '{:.2f}')} GB",
    ]
    if c.extrapolated:
        e = c.extrapolated
        lines.append(f"extrapolated to {e.layers} layers: decode {num(e.decode_tok_s)} tok/s, "
                     f"prefill {num(e.prefill_tok_s, '{:.1f}')} tok/s. {e.note}")
    lines += c.notes
    return "\n".join(lines)


def failure_record(args, error: str):
    """What a run that did not finish leaves in its JSON file (the same schema, a case with the
    error), so the report can say so."""
    from moechat.backends import benchmark

    model = str(args.model) + (f"?layers={args.layers}" if args.layers else "")
    case = {"name": case_name(args.backend, args.vram_budget_gb), "backend": args.backend, "model": model,
            "layers": args.layers, "vram_budget_gb": args.vram_budget_gb, "error": error}
    return benchmark.result(benchmark.run_info("product", "moechat bench", benchmark.machine_facts(0)),
                            asked(args), [case])


def run(args) -> int:
    from moechat.backends import benchmark
    from moechat.backends.api import BackendError

    try:
        result = measure(args)
    except BackendError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        if args.json_path:
            benchmark.write(args.json_path, failure_record(args, str(exc)))
        return 1
    print(summary(result))
    if args.json_path:
        print(f"wrote {benchmark.write(args.json_path, result)}")
    return 0
