"""`moechat bench` end to end on the CPU with tiny synthetic models, through the real manager and
worker processes; the report generated from its JSON. Numbers are not asserted, fields are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.backends import synthetic
from moechat.backends.api import BackendError

ROOT = Path(__file__).resolve().parent.parent
# Backends that run on a CPU-only machine and take synthetic: models. Add one here when it does.
CPU_BACKENDS = ["transformers", "transformers-bnb4", "moe-offload", "fake"]
GEN_TOKENS = 6
REPEAT = 2


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("moechat-home")


def bench(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moechat.webui.cli", "bench", "--no-progress", "--bandwidth-mb", "32", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, MOECHAT_HOME=str(home), MOECHAT_NO_GPU="1", GRADIO_ANALYTICS_ENABLED="False", **env))


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
        runs[backend] = (json.loads(path.read_text()), proc.stdout)
    return out, runs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bench_json_has_every_field(results, backend):
    _, runs = results
    r, stdout = runs[backend]
    assert r["schema"] == 1 and r["backend"] == backend and r["model"] == "synthetic:tiny"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*", r["date"])
    assert re.fullmatch(r"[0-9a-f]{40}", r["git_commit"]) and isinstance(r["git_dirty"], bool)
    assert r["load_time_s"] > 0 and r["load_wall_s"] >= r["load_time_s"]
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        s = r[key]
        assert len(s["values"]) == REPEAT and s["min"] <= s["median"] <= s["max"], key
    assert len(r["runs"]) == REPEAT + 1 and r["runs"][0]["warmup"] and not r["runs"][1]["warmup"]
    assert r["peak_host_bytes"] > 0 and "peak_gpu_bytes" in r          # None here: no GPU
    assert "worker_rss_bytes" in r["backend_stats"]
    m = r["machine"]
    assert m["cpu"] and m["cpu_count"] >= 1 and m["host_total_bytes"] > 0 and m["gpus"] == []
    assert m["bandwidth"]["cpu_copy_gb_s"] > 0
    assert r["settings"]["model"] == "synthetic:tiny"
    assert f"{backend} on synthetic:tiny" in stdout and "decode" in stdout


def test_transformers_runs_every_token_and_records_its_plan(results):
    """Synthetic models have no end-of-sequence token, so each run makes exactly --gen-tokens."""
    r, _ = results[1]["transformers"]
    assert [run["completion_tokens"] for run in r["runs"]] == [GEN_TOKENS] * (REPEAT + 1)
    assert r["prompt_tokens"] == 12                          # cut to the tokenizer's count
    assert r["settings"]["max_context"] == 12 + GEN_TOKENS + 64  # sized for the benchmark
    assert r["plan"]["fits"] is True and r["plan"]["summary"].startswith("This fits.")
    assert r["load_info"]["weight_bytes"]["cpu"] > 0 and r["plan_check"] is None
    assert r["backend_stats"]["worker_rss_bytes"] <= r["peak_host_bytes"]


def test_fewer_layers_are_extrapolated_and_said_so(home, tmp_path):
    path = tmp_path / "layers.json"
    proc = bench(home, "--backend", "transformers", "--model", "synthetic:tiny", "--layers", "2",
                 "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--json", str(path),
                 "--bandwidth-mb", "0", "--vram-budget-gb", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(path.read_text())
    # the budget is scaled to the depth (and is harmless without a GPU)
    from moechat.webui.commands.bench import scaled_budget
    assert r["vram_budget_gb"] == 16
    assert r["vram_budget_applied_gb"] == round(scaled_budget(16, synthetic.model_info("synthetic:tiny"), 2, 4), 3)
    assert r["vram_budget_applied_gb"] < 16
    assert r["model"] == "synthetic:tiny?layers=2" and (r["layers"], r["full_layers"]) == (2, 4)
    assert r["load_info"]["model_name"] == "synthetic:tiny?layers=2"
    ext = r["extrapolated"]
    assert ext["layers"] == 4 and ext["decode_tok_s"] == pytest.approx(r["decode_tok_s"]["median"] / 2)
    assert "2 of 4 layers" in ext["note"] and "extrapolated to 4 layers" in proc.stdout


def test_bench_refuses_a_load_that_does_not_fit_and_bad_input(home, tmp_path):
    path = tmp_path / "refused.json"
    proc = bench(home, "--backend", "transformers", "--model", "synthetic:tiny", "--bandwidth-mb", "0",
                 "--json", str(path), MOECHAT_HOST_RAM_GB="0.1")
    assert proc.returncode == 1
    sentence = "This does not fit. host RAM: needs 0.6 GB of 0.1 GB available."
    assert f"moechat: {sentence}" in proc.stderr
    # the failed run is recorded, and the report lists it
    assert json.loads(path.read_text())["error"].startswith(sentence)
    out = tmp_path / "B.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(tmp_path), "--out",
                    str(out), "--chart", str(tmp_path / "c.png")], check=True, capture_output=True, timeout=120)
    assert f"- transformers on synthetic:tiny: {sentence}" in out.read_text()
    proc = bench(home, "--backend", "transformers", "--model", str(home), "--layers", "2")
    assert proc.returncode == 1 and "--layers works only with synthetic models" in proc.stderr


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
    from moechat.webui.commands.bench import scaled_budget

    def slots(spec, budget_gib):
        machine = Machine([Gpu(0, "card", 80 * 1024**3, 0)], 512 * 1024**3, 512 * 1024**3, 16)
        settings = SimpleNamespace(vram_budget_gb=budget_gib, max_context=4096)
        return moe_offload_plan.plan(synthetic.model_info(spec), settings, machine).expect["cache_slots_per_layer"]

    full = slots("synthetic:qwen3-next-80b-a3b", budget)
    cut = f"synthetic:qwen3-next-80b-a3b?layers={layers}"
    scaled = scaled_budget(budget, synthetic.model_info(cut), layers, 48)
    assert scaled < budget
    assert abs(slots(cut, scaled) - full) <= 1, (full, slots(cut, scaled))
    assert scaled_budget(budget, synthetic.model_info(cut), 48, 48) == budget


def test_report_builds_the_table_and_chart(results, tmp_path):
    folder, runs = results
    out, chart = tmp_path / "BENCHMARKS.md", tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(folder),
                           "--out", str(out), "--chart", str(chart)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    cpu = runs["transformers"][0]["machine"]["cpu"]
    assert f"## CPU only ({cpu})" in text and "![decode tok/s per backend and budget](chart.png)" in text
    for backend in CPU_BACKENDS:
        decode = runs[backend][0]["decode_tok_s"]["median"]
        assert re.search(rf"^\| {backend} \| synthetic:tiny \| none \| {decode:.2f} ", text, re.M), backend
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_physical_bound_follows_the_cached_share():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from report import physical_bound
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bw = {"gpu_copy_gb_s": 1000.0, "cpu_copy_gb_s": 35.0, "h2d_pinned_gb_s": 25.0}
    b16, b24 = physical_bound(16, bw), physical_bound(24, bw)
    # docs/facts.md: experts on the CPU, memory-bound, int4: 77 to 116 tok/s on a 60-80 GB/s desktop
    assert 60 < b16 < b24 < 130
    assert physical_bound(24, {"cpu_copy_gb_s": 35.0}) is None   # no GPU bandwidth: no bound


def test_report_reads_the_moe_offload_engine_files(tmp_path):
    """bench/moe_offload_gpu.py writes its own JSON; the report shows its runs under the card,
    with the 4-layer ones extrapolated and the machine's bound from docs/facts.md for that card."""
    data = {
        "benchmark": "bench/moe_offload_gpu.py", "card": "NVIDIA H200", "commit": "a" * 40,
        "date_utc": "2026-11-27 22:58", "environment": {"gpu": "NVIDIA H200", "gpu_total_gb": 139.8,
                                                        "host_ram_gb": 125.9, "cpu_count": 16},
        "moe_offload_48_layers": {"layers": 48, "host_peak_gb": 39.0, "runs": [
            {"vram_budget_gb": 16.0, "decode_tok_s": 8.45, "prefill_tok_s": 428.7, "cache_share": 0.25,
             "gpu_peak_allocated_gb": 14.45, "host_peak_gb": 39.0}]},
        "transformers_bnb4_4_layers": {"layers": 4, "gpu_memory_gb": 3.06, "decode_tok_s": 0.0578,
                                       "prefill_tok_s": 3.89, "gpu_peak_allocated_gb": 1.74, "host_peak_gb": 36.1},
    }
    results = tmp_path / "results"
    results.mkdir()
    (results / "moe_offload_gpu_h200.json").write_text(json.dumps(data))
    out, chart = tmp_path / "B.md", tmp_path / "c.png"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(results), "--out", str(out),
                    "--chart", str(chart)], check=True, capture_output=True, timeout=120)
    text = out.read_text()
    assert "## NVIDIA H200" in text and "Physical bound for batch-1 decode on this machine" in text
    assert "| moe-offload (engine) | synthetic:qwen3-next-80b-a3b | 16 GB | 8.45 (8.45-8.45) | 8.45 |" in text
    assert ("| transformers-bnb4 (random checkpoint) | synthetic:qwen3-next-80b-a3b, 4 of 48 layers | 24 GB "
            "| 0.058 (0.058-0.058) | 0.0048 (extrapolated) |") in text
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_report_shows_the_moe_offload_speed_run_with_its_bound_and_parts(tmp_path):
    """bench/moe_offload_speed.py's committed result: the report puts each run with the bound
    computed from the bandwidths measured in that run, and splits each token's time by part."""
    src = ROOT / "bench" / "results" / "moe_offload_speed_h100_2026-11-28.json"
    data = json.loads(src.read_text())
    results = tmp_path / "results"
    results.mkdir()
    (results / src.name).write_text(src.read_text())
    out = tmp_path / "B.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(results), "--out", str(out),
                    "--chart", str(tmp_path / "c.png")], check=True, capture_output=True, timeout=120)
    text = out.read_text()
    assert f"## moe-offload speed: {data['environment']['gpu']}" in text
    sys.path.insert(0, str(ROOT / "bench"))
    from report import speed_bound, speed_parts

    machine, parts = data["machine"], data["runs"][0]["parts"]
    for run in data["runs"]:
        bound = speed_bound(run, machine)
        # the bound is faster than the run, and the row shows both
        assert bound["bound_ms"] < run["decode_ms_per_token"]
        assert f"**{run['decode_tok_s']:.1f}** | {run['decode_ms_per_token']:.1f} |" in text
        assert f"| {bound['bound_tok_s']:.0f} | {bound['share']:.0%} |" in text
        split = speed_parts(run, parts, machine)
        assert abs(sum(split.values()) - run["decode_ms_per_token"]) < 1e-9 and split["host_and_rest_ms"] > 0
    assert f"**{data['same_depth_comparison']['moe_offload_over_bnb4']:.0f}x**" in text


def test_report_puts_the_newest_speed_run_first_with_its_prefill_detail(tmp_path):
    """Several committed speed results: newest run first, each with its note, and a run's
    prefill measured several ways shows every way's speed and where the time went."""
    results = tmp_path / "results"
    results.mkdir()
    files = sorted((ROOT / "bench" / "results").glob("moe_offload_speed_*.json"))
    datas = [json.loads(f.read_text()) for f in files]
    for f in files:
        (results / f.name).write_text(f.read_text())
    out = tmp_path / "B.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", str(results), "--out", str(out),
                    "--chart", str(tmp_path / "c.png")], check=True, capture_output=True, timeout=120)
    text = out.read_text()
    starts = {d["environment"]["commit"]: text.index(f"commit {d['environment']['commit']}\n") for d in datas}
    newest_first = sorted(datas, key=lambda d: d["environment"]["date_utc"], reverse=True)
    assert [starts[d["environment"]["commit"]] for d in newest_first] == sorted(starts.values())
    detailed = [(d, r) for d in datas for r in d["runs"] if r.get("prefill_detail")]
    assert detailed, "a committed run measures prefill several ways"
    for d, r in detailed:
        assert d["note"] in text
        for way in r["prefill_detail"]["ways"]:
            assert f"| {way['way']} | {way['s']:.3f} | **{way['tok_s']:.0f}** |" in text
        assert f"routed experts {r['prefill_detail']['modules_ms']['routed experts']:.0f} ms" in text
