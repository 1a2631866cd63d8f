#!/usr/bin/env bash
# The comparison set on a GPU machine, in under 10 minutes: every backend that can run there
# (moe-offload, transformers-bnb4, transformers, vllm when its interpreter is there), on
# Qwen3-Next-80B-A3B's shapes (random weights; the FULL backends at all 48 layers, the others at
# LAYERS of 48 layers at full width, extrapolated to 48), at 16 and 24 GB VRAM budgets (enforced
# in the worker). Writes one JSON per run to
# bench/results/compare-DATE-CARD/ and regenerates BENCHMARKS.md and bench/chart.png.
#
#   bench/gpu_compare.sh                   # from the repository root
#   MOECHAT_GIT_COMMIT=$(git rev-parse HEAD)   # set it where the copy of the tree has no .git
#   BACKENDS="moe-offload transformers" LAYERS=4 bench/gpu_compare.sh
#
# Each run is stopped after PER_RUN_S seconds, and a run that could not finish before TOTAL_S is
# not started; both are recorded as failures, so the whole set stays under 10 minutes.
# The backends that stream offloaded weights through accelerate (SLOW, seconds per token at 4
# layers on an H200) run at SLOW_LAYERS layers with a short prompt, a few tokens, no warm-up.
#
# llama.cpp runs GGUF files, not synthetic specs: bench/llamacpp_gpu.py runs it next to moe-offload.
# Needs: torch with CUDA, transformers, accelerate, and moechat's own small dependencies
# (pluggy, loguru, pydantic, psutil, platformdirs, tokenizers; bitsandbytes for transformers-bnb4;
# matplotlib for the chart). Wheels in $WHEELS (default shared/wheels) are installed offline first.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LAYERS=${LAYERS:-4}
BUDGETS=${BUDGETS:-"16 24"}
BACKENDS=${BACKENDS:-}
PROMPT=${PROMPT:-256}
GEN=${GEN:-12}
REPEAT=${REPEAT:-2}
PER_RUN_S=${PER_RUN_S:-120}
TOTAL_S=${TOTAL_S:-560}
SLOW=${SLOW:-"transformers transformers-bnb4"}
SLOW_LAYERS=${SLOW_LAYERS:-2}
WHEELS=${WHEELS:-shared/wheels}
OUT=${OUT:-bench/results}
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MOECHAT_HOME=${MOECHAT_HOME:-$(mktemp -d /tmp/moechat-bench.XXXXXX)}
mkdir -p "$OUT"
start=$(date +%s)

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3
fi
# backends are found through entry points, so moechat must be installed (editable, offline); where
# pip cannot, a bare dist-info with the entry points on PYTHONPATH does the same
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import importlib.metadata as m; m.distribution('moechat')" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
if ! "$PY" -c "import importlib.metadata as m; m.distribution('moechat')" 2>/dev/null; then
  site=$(mktemp -d /tmp/moechat-site.XXXXXX)
  "$PY" - "$site" <<'PYEOF'
import sys, tomllib
from pathlib import Path
meta = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"moechat-{meta['version']}.dist-info"
info.mkdir(parents=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: moechat\nVersion: {meta['version']}\n")
lines = []
for group, eps in meta.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in eps.items()]
(info / "entry_points.txt").write_text("\n".join(lines) + "\n")
PYEOF
  export PYTHONPATH="$site:$PYTHONPATH"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_compare.sh: torch sees no CUDA GPU here; run it on a GPU machine." >&2
  exit 1
fi
missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('pluggy', 'loguru', 'pydantic', 'psutil', 'platformdirs', 'tokenizers',
                            'transformers', 'accelerate') if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "gpu_compare.sh: missing Python packages: $missing (put their wheels in $WHEELS)." >&2
  exit 1
fi

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
stamp=$(date -u +%Y%m%d-%H%M)
# one folder per comparison
OUT="$OUT/compare-${stamp}-${card}"
mkdir -p "$OUT"
"$PY" -m moechat.webui.cli plugins
if [ -z "$BACKENDS" ]; then  # every backend that can run here, but the test and remote ones
  BACKENDS=$("$PY" -m moechat.webui.cli plugins --json | "$PY" -c "
import json, sys
rows = json.load(sys.stdin)['backends']
order = ['moe-offload', 'transformers-bnb4', 'transformers', 'vllm']
names = [r['name'] for r in rows if r['available'] and r['name'] not in ('fake', 'remote')]
print(' '.join(sorted(names, key=lambda n: order.index(n) if n in order else len(order))))")
fi
echo "backends: $BACKENDS; budgets: $BUDGETS GB; $LAYERS of 48 layers"

record_failure() {  # FILE BACKEND BUDGET LAYERS SENTENCE
  "$PY" -c "
import json, sys
from argparse import Namespace
from moechat.backends import benchmark
from moechat.webui.commands.bench import failure_record
path, backend, budget, layers, sentence = sys.argv[1:]
args = Namespace(backend=backend, model='synthetic:qwen3-next-80b-a3b', layers=int(layers), vram_budget_gb=float(budget))
benchmark.write(path, failure_record(args, sentence))" "$@"
}
# backends fast enough that a token's fixed cost matters run at the full depth: extrapolating them
# from a few layers multiplies that cost too (docs/benchmarks.md, "Extrapolation")
FULL=${FULL:-"moe-offload"}
layers_of() {
  case " $SLOW " in *" $1 "*) echo "$SLOW_LAYERS"; return ;; esac
  case " $FULL " in *" $1 "*) echo 48 ;; *) echo "$LAYERS" ;; esac
}

for budget in $BUDGETS; do
  for backend in $BACKENDS; do
    name="$OUT/${backend}-${budget}gb.json"
    elapsed=$(( $(date +%s) - start ))
    if [ $(( elapsed + PER_RUN_S )) -gt "$TOTAL_S" ]; then
      echo "== $backend at ${budget} GB: skipped, the ${TOTAL_S} s budget is used up"
      record_failure "$name" "$backend" "$budget" "$(layers_of "$backend")" "Not run: the comparison's ${TOTAL_S} s were used up."
      continue
    fi
    shape=(--layers "$(layers_of "$backend")" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --repeat "$REPEAT")
    case " $SLOW " in
      *" $backend "*) shape=(--layers "$SLOW_LAYERS" --prompt-tokens 16 --gen-tokens 3 --repeat 1 --warmup 0) ;;
    esac
    echo "== $backend at ${budget} GB: ${shape[*]} (${elapsed} s so far)"
    timeout --signal=TERM --kill-after=10 "$PER_RUN_S" "$PY" -m moechat.webui.cli bench --backend "$backend" \
      --model synthetic:qwen3-next-80b-a3b --vram-budget-gb "$budget" "${shape[@]}" --no-progress --json "$name"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "   $backend at ${budget} GB took more than ${PER_RUN_S} s; stopped."
      record_failure "$name" "$backend" "$budget" "$(layers_of "$backend")" "Stopped after ${PER_RUN_S} s without finishing."
    fi
  done
done
# the report and chart need matplotlib; without it, run `make bench-report` where it is installed
"$PY" bench/report.py || echo "gpu_compare.sh: report not generated here; run make bench-report after committing the JSON."
echo "gpu_compare.sh: done in $(( $(date +%s) - start )) s; results in $OUT"
