"""The benchmarks: `moechat bench` (the product path) end to end on the CPU with tiny synthetic
models, through the real manager and worker processes; bench/moe_offload_speed.py (the engine
profile) on the CPU; both results read back through the one schema's validator; the report
generated from that real output; README's headline from the committed results. Numbers are not
asserted, fields are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.backends import benchmark, synthetic
from moechat.backends.api import BackendError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Backends that run on a CPU-only machine and take synthetic: models. Add one here when it does.
CPU_BACKENDS = ["transformers", "transformers-bnb4", "moe-offload", "fake"]
GEN_TOKENS = 6
REPEAT = 2


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("moechat-home")


def env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, MOECHAT_HOME=str(home), MOECHAT_NO_GPU="1", GRADIO_ANALYTICS_ENABLED="False", **extra)


def bench(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """`moechat bench`, run from outside the checkout (it needs no repository path)."""
    return subprocess.run(
        [sys.executable, "-m", "moechat.webui.cli", "bench", "--no-progress", "--bandwidth-mb", "32", *args],
        capture_output=True, text=True, cwd=home, timeout=300, env=env(home, **extra))


def speed(home: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """bench/moe_offload_speed.py on the CPU with a tiny synthetic model (one budget, one routing)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_offload_speed.py"), "--model", "synthetic:tiny", "--device", "cpu",
         "--prompt", "8", "--decode", "3", "--warmup", "1", "--skip", "check", "uniform", "machine", "prefill",
         "--out", str(out), *args], capture_output=True, text=True, cwd=home, timeout=300, env=env(home))


def report(results: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "B.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(results), "--out",
                           str(out), "--chart", str(tmp_path / "chart.png"), *extra],
                          capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.fixture(scope="module")
def results(home, tmp_path_factory):
    """One bench run per CPU backend, written as JSON like bench/gpu_compare.sh does."""
    out = tmp_path_factory.mktemp("results")
    runs = {}
    for backend in CPU_BACKENDS:
        path = out / f"{backend}.json"
        proc = bench(home, "--backend", backend, "--model", "synthetic:tiny", "--prompt-tokens", "12",
                     "--gen-tokens", str(GEN_TOKENS), "--repeat", str(REPEAT), "--json", str(path))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[backend] = (benchmark.read(path), proc.stdout)
    return out, runs


@pytest.fixture(scope="module")
def profile(home, tmp_path_factory):
    """bench/moe_offload_speed.py's real output: 2 of tiny's 4 layers, standing for a 16 GB card."""
    path = tmp_path_factory.mktemp("profile") / "moe_offload_speed_cpu.json"
    proc = speed(home, path, "--layers", "2", "--budgets", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return benchmark.read(path)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bench_json_has_every_field(results, backend):
    _, runs = results
    r, stdout = runs[backend]
    assert r.schema_version == benchmark.SCHEMA_VERSION and r.run.kind == "product"
    assert r.run.producer == "moechat bench" and r.run.card is None and r.run.driver is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*\+00:00", r.run.date)
    assert re.fullmatch(r"[0-9a-f]{40}", r.run.commit) and isinstance(r.run.dirty, bool)
    assert r.settings["backend"] == backend and r.settings["repeat"] == REPEAT
    [c] = r.cases
    assert c.backend == backend and c.model == "synthetic:tiny" and c.error is None
    assert c.load_time_s > 0 and c.detail["load_wall_s"] >= c.load_time_s
    for s in (c.ttft_s, c.prefill_tok_s, c.decode_tok_s):
        assert len(s.values) == REPEAT and s.min <= s.median <= s.max
    runs_ = c.detail["runs"]
    assert len(runs_) == REPEAT + 1 and runs_[0]["warmup"] and not runs_[1]["warmup"]
    assert c.peak_host_bytes > 0 and c.peak_gpu_bytes is None          # no GPU here
    assert "worker_rss_bytes" in c.backend_stats
    m = r.run.machine
    assert m.cpu and m.cpu_count >= 1 and m.host_total_bytes > 0 and m.gpus == []
    assert m.bandwidth["cpu_copy_gb_s"] > 0                  # moechat.backends.hwprobe ran
    assert c.detail["settings"]["model"] == "synthetic:tiny"
    assert f"{backend} on synthetic:tiny" in stdout and "decode" in stdout


def test_transformers_runs_every_token_and_records_its_plan(results):
    """Synthetic models have no end-of-sequence token, so each run makes exactly --gen-tokens."""
    r, _ = results[1]["transformers"]
    [c] = r.cases
    assert [run["completion_tokens"] for run in c.detail["runs"]] == [GEN_TOKENS] * (REPEAT + 1)
    assert c.prompt_tokens == 12                          # cut to the tokenizer's count
    assert c.detail["settings"]["max_context"] == 12 + GEN_TOKENS + 64  # sized for the benchmark
    plan = c.detail["plan"]
    assert plan["fits"] is True and plan["summary"].startswith("This fits.")
    assert c.detail["load_info"]["weight_bytes"]["cpu"] > 0 and c.notes == []
    assert c.backend_stats["worker_rss_bytes"] <= c.peak_host_bytes


def test_peak_host_memory_counts_the_processes_the_worker_started():
    """vLLM's engine core and a llama.cpp server hold the model in a child of the worker: a bench
    that counted the worker alone showed vLLM's front end (1 GB) for a whole engine."""
    from moechat.webui.commands.bench import peak_rss

    alone = peak_rss(os.getpid())
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(300 * 2**20); "
                               "b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert peak_rss(os.getpid()) - alone > 300 * 2**20
    finally:
        holder.kill()
        holder.wait()


def test_fewer_layers_are_extrapolated_and_said_so(home, tmp_path):
    path = tmp_path / "layers.json"
    proc = bench(home, "--backend", "transformers", "--model", "synthetic:tiny", "--layers", "2",
                 "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--json", str(path),
                 "--bandwidth-mb", "0", "--vram-budget-gb", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [c] = benchmark.read(path).cases
    # the budget is scaled to the depth (and is harmless without a GPU)
    assert c.vram_budget_gb == 16
    assert c.vram_budget_applied_gb == round(
        benchmark.scaled_budget(16, synthetic.model_info("synthetic:tiny"), 2, 4), 3) < 16
    assert c.model == "synthetic:tiny?layers=2" and (c.layers, c.full_layers) == (2, 4)
    assert c.detail["load_info"]["model_name"] == "synthetic:tiny?layers=2"
    ext = c.extrapolated
    assert ext.layers == 4 and ext.decode_tok_s == pytest.approx(c.decode_tok_s.median / 2)
    assert "2 of 4 layers" in ext.note and "extrapolated to 4 layers" in proc.stdout


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_a_checkpoint_written_from_synthetic_shapes_is_benchmarked_and_extrapolated(home, tmp_path, fmt, monkeypatch):
    """A release-layout folder written from synthetic:tiny at 2 of 4 layers (as the GPU runs write
    the 80B widths for vLLM and for load timings): moe-offload loads it from disk and the result is
    extrapolated to the full depth like the synthetic spec itself."""
    from moechat.backends import fp8_checkpoint

    monkeypatch.setenv("MOECHAT_HOME", str(home))
    folder = fp8_checkpoint.write("synthetic:tiny?layers=2", tmp_path / f"tiny-{fmt}", device="cpu",
                                  fmt=fmt, progress=lambda *_: None)
    cfg = json.loads((folder / "config.json").read_text())
    assert ("quantization_config" in cfg) == (fmt == "fp8") and cfg["num_hidden_layers"] == 2
    assert synthetic.written_from(folder) == synthetic.Spec("tiny", 2) and synthetic.written_from(tmp_path) is None
    path = tmp_path / "run.json"
    proc = bench(home, "--backend", "moe-offload", "--model", str(folder), "--prompt-tokens", "8",
                 "--gen-tokens", "3", "--repeat", "1", "--json", str(path), "--bandwidth-mb", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [c] = benchmark.read(path).cases
    assert (c.layers, c.full_layers) == (2, 4) and c.extrapolated.layers == 4
    assert c.detail["load_info"]["checkpoint_format"] == {"fp8": "fp8-block", "bf16": "dense"}[fmt]
    # tiny's expert widths (64 and 32) are narrower than the default group (128): the load takes the widest
    # group that divides them instead of failing
    assert c.detail["load_info"]["int4_group"] == 32
    # the first load converts the experts and writes them to the cache; the stages' times say how long each took
    stages = [s["stage"] for s in c.detail["load_stages"]]
    assert "Loading weights and converting experts" in stages and "Writing converted experts to the cache" in stages
    assert sum(s["s"] for s in c.detail["load_stages"]) <= c.detail["load_wall_s"] + 1e-6
    assert c.detail["host_rss_after_load_bytes"] > 0
    # the second load reads the converted experts back from the cache
    proc = bench(home, "--backend", "moe-offload", "--model", str(folder), "--prompt-tokens", "8", "--gen-tokens", "3",
                 "--repeat", "1", "--json", str(path), "--bandwidth-mb", "0", "--note", "cached load")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = benchmark.read(path)
    assert "Reading converted experts from the cache" in [s["stage"] for s in result.cases[0].detail["load_stages"]]
    assert result.notes == ["cached load"] and result.cases[0].detail["load_info"]["experts_from_disk_cache"]


def test_bench_refuses_a_load_that_does_not_fit_and_bad_input(home, tmp_path):
    path = tmp_path / "results" / "refused.json"
    proc = bench(home, "--backend", "transformers", "--model", "synthetic:tiny", "--bandwidth-mb", "0",
                 "--json", str(path), MOECHAT_HOST_RAM_GB="0.1")
    assert proc.returncode == 1
    sentence = "This does not fit. host RAM: needs 0.6 GB of 0.1 GB available."
    assert f"moechat: {sentence}" in proc.stderr
    # the failed run is recorded in the schema, and the report lists it
    [c] = benchmark.read(path).cases
    assert c.error.startswith(sentence)
    proc, out = report(path.parent, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"- transformers on synthetic:tiny: {sentence}" in out.read_text()
    proc = bench(home, "--backend", "transformers", "--model", str(home), "--layers", "2")
    assert proc.returncode == 1 and "--layers works only with synthetic models" in proc.stderr
    # the manager's check: the backend and its settings, each with its sentence
    proc = bench(home, "--backend", "nope", "--model", "synthetic:tiny", "--bandwidth-mb", "0")
    assert proc.returncode == 1 and "moechat: There is no backend named 'nope'." in proc.stderr
    proc = bench(home, "--backend", "transformers", "--model", "synthetic:tiny", "--bandwidth-mb", "0",
                 "--set", "max_context=-5")
    assert proc.returncode == 1 and "max_context" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_profile_builds_through_the_backend_and_writes_the_schema(profile):
    r = profile
    assert r.run.kind == "engine-profile" and r.run.producer == "bench/moe_offload_speed.py"
    assert r.run.versions["torch"] and r.settings["model"] == "synthetic:tiny"
    [c] = r.cases
    assert c.error is None and c.backend == "moe-offload" and c.model == "synthetic:tiny?layers=2"
    # built by MoeOffloadBackend.load: its synthetic build and its options
    assert c.backend_stats["checkpoint_format"] == "synthetic" and c.backend_stats["device"] == "cpu"
    assert c.decode_tok_s.values == [c.decode_tok_s.median] and c.prefill_tok_s.median > 0
    assert c.completion_tokens == 3 and c.peak_host_bytes > 0 and c.peak_gpu_bytes is None
    assert c.extrapolated.layers == 4 and c.extrapolated.decode_tok_s == pytest.approx(c.decode_tok_s.median / 2)
    assert c.detail["routing"] == "the random model's router" and "decode_ms_per_token" in c.detail


def test_one_budget_formula_for_every_producer(home, tmp_path, profile):
    """The product bench and the engine profile give the same reduced-depth run the same budget,
    from the one formula; 16 GB at 4 of the 80 B model's 48 layers keeps the fixed part."""
    path = tmp_path / "p.json"
    proc = bench(home, "--backend", "fake", "--model", "synthetic:tiny", "--layers", "2", "--vram-budget-gb", "16",
                 "--prompt-tokens", "4", "--gen-tokens", "2", "--repeat", "1", "--bandwidth-mb", "0",
                 "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [product] = benchmark.read(path).cases
    [engine] = profile.cases
    assert (product.vram_budget_gb, product.layers) == (engine.vram_budget_gb, engine.layers) == (16, 2)
    assert product.vram_budget_applied_gb == engine.vram_budget_applied_gb < 16
    big = synthetic.model_info("synthetic:qwen3-next-80b-a3b")
    fixed = benchmark.FIXED_GPU_BYTES + 2 * 151936 * 2048 * 2          # work area, embeddings, lm_head in bf16
    assert benchmark.scaled_budget(16, big, 4, 48) == pytest.approx((fixed + (16 * 1024**3 - fixed) * 4 / 48) / 1024**3)
    assert benchmark.scaled_budget(16, big, 48, 48) == 16
    # no second formula: every line that scales by the depth (a budget, or speeds) is in the schema module
    scaling = re.compile(r"layers\s*/\s*(48|full)\b|/\s*48\b")
    found = {str(p.relative_to(ROOT))
             for p in (*ROOT.glob("backends/**/*.py"), *ROOT.glob("webui/**/*.py"), *ROOT.glob("bench/*.py"))
             for line in p.read_text().splitlines() if scaling.search(line)}
    assert found == {"backends/benchmark.py"}, found


def test_report_renders_the_producers_real_output(results, profile, tmp_path):
    folder, runs = results
    benchmark.write(folder / "moe_offload_speed_cpu.json", profile)
    proc, out = report(folder, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    cpu = runs["transformers"][0].run.machine.cpu
    assert f"## CPU only ({cpu})" in text and "![decode tok/s per backend and budget](chart.png)" in text
    for backend in CPU_BACKENDS:
        decode = runs[backend][0].cases[0].decode_tok_s.median
        assert re.search(rf"^\| {backend} \| synthetic:tiny \| none \| {decode:.2f} ", text, re.M), backend
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [c] = profile.cases
    assert "## moe-offload engine profiles" in text and "(moe_offload_speed_cpu.json)" in text
    assert f"| 16 GB | the random model's router | 0% | **{c.decode_tok_s.median:.1f}** |" in text
    (folder / "moe_offload_speed_cpu.json").unlink()


def test_loads_get_a_table_of_their_own_apart_from_decode_speeds(results, tmp_path):
    """A bench/load_at_scale.py result (its notes say which load) is listed with its load stages
    under the loads, not as a decode speed beside the backends' runs."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from load_at_scale import FIRST_LOAD
    finally:
        sys.path.remove(str(ROOT / "bench"))
    folder, runs = results
    raw = json.loads((folder / "moe-offload.json").read_text())
    raw["notes"] = [f"{FIRST_LOAD} reads the checkpoint, converts the experts, writes the cache."]
    raw["cases"][0]["detail"]["load_stages"] = [{"stage": "Reading the checkpoint index", "s": 1.25}]
    loads = tmp_path / "loads"
    loads.mkdir()
    (loads / "load-fp8-2l-first.json").write_text(json.dumps(raw))
    proc, out = report(loads, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    case = runs["moe-offload"][0].cases[0]
    assert re.search(rf"^\| synthetic:tiny \| first \| {case.load_time_s:.1f} \| Reading the checkpoint index 1.2 \|",
                     text, re.M)
    assert "| backend | model | budget |" not in text.split("## Headline")[1].split("Loads at full width")[0].split(
        "<!-- end of headline -->")[1]


def test_the_schema_refuses_what_does_not_fit(results, tmp_path):
    r, _ = results[1]["fake"]
    good = r.model_dump(mode="json")
    for broken, words in (
            (dict(good, run=dict(good["run"], kind="guess")), "run.kind"),
            (dict(good, cases=[dict(good["cases"][0], decode_tok_s={"median": None})]), "neither a decode speed"),
            (dict(good, cases=[dict(good["cases"][0], layers=2, full_layers=4)]), "extrapolated"),
            (dict(good, run=dict(good["run"], date="yesterday")), "ISO 8601"),
            (dict(good, tok_s=1), "tok_s")):
        with pytest.raises(benchmark.BenchSchemaError, match=words):
            benchmark.validate(broken)
    # a file in an old shape stops the report with a sentence naming it
    folder = tmp_path / "results"
    folder.mkdir()
    old = RESULTS / "archive" / "moe_offload_speed_h100_2026-11-28_grouped-prefill.json"
    (folder / old.name).write_text(old.read_text())
    proc, _ = report(folder, tmp_path)
    assert proc.returncode == 1 and f"{folder / old.name} does not fit the benchmark schema" in proc.stderr


def test_readme_headline_is_what_the_report_makes_from_the_committed_results():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report as rep
    finally:
        sys.path.remove(str(ROOT / "bench"))
    committed = rep.load_results(RESULTS)
    table = rep.headline(committed)
    for page in ("README.md", "BENCHMARKS.md"):
        text = (ROOT / page).read_text()
        assert table in text, f"{page}'s headline is not what bench/report.py makes; run `make bench-report`"
    # every headline row is a product-path case of the full model, with card, commit and date
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| backend")]
    assert rows
    product = {(c.backend, r.run.card, r.run.commit[:8], r.run.date[:10]) for r, c in rep.product_rows(committed)
               if c.model.startswith(rep.FULL_MODEL)}
    for row in rows:
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert (cells[0], cells[1], cells[7], cells[8]) in product, row
    # every committed result fits the schema; only the archive holds older shapes
    assert all(r.schema_version == benchmark.SCHEMA_VERSION for _, r in committed)


def test_converted_results_are_the_archived_originals_field_by_field():
    converted = sorted(p for p in RESULTS.rglob("*.json") if "archive" not in p.parts
                       and benchmark.read(p).detail.get("converted_from"))
    assert converted, "the schema-1 comparison is committed converted"
    for path in converted:
        r = benchmark.read(path)
        original = RESULTS / r.detail["converted_from"]
        assert original.parent.parent.name == "archive" or "archive" in original.parts
        assert r == benchmark.upgrade_v1(json.loads(original.read_text()), r.detail["converted_from"]), path


def test_hwprobe_runs_from_the_package(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moechat.backends.hwprobe", "--mb", "8", "--repeat", "2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True).stdout
    probe = json.loads(out)
    assert probe["cpu_copy_gb_s"] > 0 and probe["cpu_read_gb_s"] > 0


def test_physical_bound_follows_the_cached_share():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from report import physical_bound
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bw = {"gpu_copy_gb_s": 1000.0, "cpu_copy_gb_s": 35.0, "h2d_pinned_gb_s": 25.0}
    b16, b24 = physical_bound(16, bw), physical_bound(24, bw)
    # the misses through both pipes at once, a 70 GB/s host read beside 25 GB/s of PCIe: about
    # 4.6 ms a token at 16 GB, where the CPU alone would take about 6 (docs/moe-offload.md)
    assert 85 < b16 < b24 < 130
    assert physical_bound(16, {**bw, "h2d_pinned_gb_s": 0}) < b16   # PCIe adds to the host's read
    assert physical_bound(24, {"cpu_copy_gb_s": 35.0}) is None   # no GPU bandwidth: no bound


def test_a_runs_bound_counts_its_misses_on_either_pipe():
    """A token whose misses the CPU computes has the same bound as one whose misses cross PCIe:
    the bound is the machine's, the split is the run's."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from report import speed_bound
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bw = {"gpu_copy_gb_s": 1000.0, "cpu_read_gb_s": 75.0, "h2d_pinned_gb_s": 25.0, "expert_bytes": 1_000_000}
    base = {"decode_ms_per_token": 20.0, "resident_gb": 3.0, "decode_hit_rate": 0.25}
    stats = {"top_k": 10, "moe_layers": 48}
    pcie = SimpleNamespace(detail={**base, "pcie_mb_per_token": 360.0}, backend_stats=stats)
    hybrid = SimpleNamespace(detail={**base, "pcie_mb_per_token": 160.0, "cpu_experts_per_token": 200},
                             backend_stats=stats)
    b = speed_bound(pcie, bw)
    assert b == speed_bound(hybrid, bw)
    # 360 MB at 100 GB/s: 3.6 ms of the bound's time are the misses
    assert 3.6 < b["bound_ms"] < 3.6 + 5.0


def test_synthetic_specs_parse_and_cut_depth_only():
    spec = synthetic.parse("synthetic:qwen3-next-80b-a3b?layers=4")
    cfg = synthetic.config(spec)
    full = synthetic.qwen3_next_80b_a3b()
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == full["hidden_size"]
    assert cfg["num_experts"] == 512 and cfg["eos_token_id"] is None
    info = synthetic.model_info(str(spec))
    assert info.path == "synthetic:qwen3-next-80b-a3b?layers=4" and info.num_layers == 4
    assert synthetic.config("synthetic:tiny?layers=2")["layer_types"] == ["linear_attention", "full_attention"]
    for bad, words in (("synthetic:gpt5", "There is no synthetic model 'gpt5'"),
                       ("synthetic:tiny?layers=9", "between 1 and 4"),
                       ("synthetic:tiny?depth=2", "unknown option 'depth'")):
        with pytest.raises(BackendError, match=words):
            synthetic.parse(bad)


def test_random_weights_differ_per_expert_and_are_finite():
    import torch

    model = synthetic.build_transformers_model("synthetic:tiny", lambda p: None, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == synthetic.model_info("synthetic:tiny").param_count
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    router = model.model.layers[0].mlp.gate.weight
    assert len({tuple(row.tolist()) for row in router}) == router.shape[0]  # no expert favoured by copy
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])




@pytest.mark.parametrize("budget", [16, 24])
@pytest.mark.parametrize("layers", [2, 4, 8])
def test_a_scaled_budget_gives_each_layer_the_cache_share_of_the_full_model(budget, layers):
    """What the scaling is for: moe-offload at N of 48 layers with the scaled budget caches the
    same share of each layer's experts as the whole model with the whole budget (the slots the
    engine computes, through the plan that computes them the same way)."""
    from types import SimpleNamespace

    from moechat.backends.machine import Gpu, Machine
    from moechat.backends.moe_offload import plan as moe_offload_plan

    def slots(spec, budget_gib):
        machine = Machine([Gpu(0, "card", 80 * 1024**3, 0)], 512 * 1024**3, 512 * 1024**3, 16)
        settings = SimpleNamespace(vram_budget_gb=budget_gib, max_context=4096)
        return moe_offload_plan.plan(synthetic.model_info(spec), settings, machine).expect["cache_slots_per_layer"]

    full = slots("synthetic:qwen3-next-80b-a3b", budget)
    cut = f"synthetic:qwen3-next-80b-a3b?layers={layers}"
    scaled = benchmark.scaled_budget(budget, synthetic.model_info(cut), layers, 48)
    assert scaled < budget
    assert abs(slots(cut, scaled) - full) <= 1, (full, slots(cut, scaled))
    assert benchmark.scaled_budget(budget, synthetic.model_info(cut), 48, 48) == budget


def test_the_desktop_projection_follows_each_box_pipes_from_the_committed_runs():
    """From the committed H100 runs (pcie, cpu and hybrid at 16 GB, hybrid again with 8 threads):
    a labelled projection, a row per box and thread count, whose columns follow the pipes: PCIe
    alone the link, the CPU alone the slower of its kernel and the box's memory, and both pipes
    never more than that memory."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report as rep
    finally:
        sys.path.remove(str(ROOT / "bench"))
    group = [r for _, r in rep.load_results(RESULTS) if r.run.kind == "engine-profile"
             and r.run.card == "NVIDIA H100 80GB HBM3" and rep.commit_of(r) == "481e4ea5"]
    lines = rep.desktop_projection(group)
    assert lines[0].startswith("**PROJECTION (not measured)") and "the measured host read 94 GB/s" in lines[0]
    rows = {tuple(ln.split(" | ")[i].lstrip("| ") for i in (0, 2)): [float(v.strip("* |")) for v in ln.split(" | ")[4:]]
            for ln in lines if ln.startswith("| PCIe 4.0")}
    assert {n for _, n in rows} == {"16", "8"} and len(rows) == 2 * len(rep.BOXES)
    ddr5, ddr4 = "PCIe 4.0 x16 + DDR5 dual channel", "PCIe 4.0 x16 + DDR4 dual channel"
    x8 = "PCIe 4.0 x8 + DDR5 dual channel"
    for n in ("16", "8"):
        assert rows[x8, n][0] < rows[ddr5, n][0] and rows[x8, n][1] == rows[ddr5, n][1]  # PCIe alone follows the link
        assert rows[ddr4, n][1] < rows[ddr5, n][1] and rows[ddr4, n][0] == rows[ddr5, n][0]  # the CPU alone, the memory
        for pipe in ("PCIe 4.0 x16", "PCIe 4.0 x8"):
            for ddr in ("DDR5", "DDR4"):
                pcie_only, cpu_only, hybrid = rows[f"{pipe} + {ddr} dual channel", n]
                assert hybrid >= max(pcie_only, cpu_only)
    # 16 threads read 70 GB/s, more than 85 % of dual-channel DDR5's 70: the memory is full without
    # PCIe; 8 threads read 45 GB/s and leave room for it
    assert rows[ddr5, "16"][2] == rows[ddr5, "16"][1]
    assert rows[ddr5, "8"][1] < rows[ddr5, "8"][2] == rows[ddr5, "16"][2]


def test_archived_hybrid_runs_show_each_miss_policy_and_the_labelled_projection():
    """The archived engine runs of hybrid decode: BENCHMARKS.md shows every miss policy's row with
    what each pipe carried and achieved, and the desktop projection under a PROJECTION label with
    its assumptions; using both pipes never projects slower than either alone."""
    sys.path.insert(0, str(ROOT / "bench"))
    from report import render_archive

    text = "\n".join(render_archive(ROOT / "bench" / "results"))
    files = sorted((ROOT / "bench" / "results" / "archive").glob("moe_offload_speed_*.json"))
    hybrid = [json.loads(f.read_text()) for f in files]
    hybrid = [d for d in hybrid if any(len(r.get("by_policy", [])) > 1 for r in d["runs"])]
    assert hybrid, "an archived run measures decode per miss policy"
    for data in hybrid:
        for run in data["runs"]:
            routing = "uniform" if run["routing"].startswith("uniform") else "router"
            for p in run["by_policy"] if len(run["by_policy"]) > 1 else []:
                assert (f"| {run['vram_budget_gb']:g} GB | {routing} | {p['miss_policy']} ({p['decode_miss_policy']}) | "
                        f"{p['cpu_threads']} | **{p['decode_tok_s']:.1f}** |") in text
        proj = data["projection"]
        assert proj["label"].startswith("PROJECTION (not measured)") and proj["label"] in text
        for a in proj["assumptions"]:
            assert a in text
        for row in proj["rows"]:
            assert row["hybrid_tok_s"] >= max(row["pcie_tok_s"], row["cpu_tok_s"])
