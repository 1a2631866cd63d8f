#!/usr/bin/env bash
# On the lent GPU machine: install vLLM from the carried wheel parts, write the FP8 test checkpoint,
# run scripts/vllm_gpu_check.py. The same command for every call; each call does what is due:
#
#   bash scripts/vllm-gpu-run.sh              store the carried .whl-vllm/part-NN; once every core part
#                                             is stored: assemble, install, write the checkpoint
#   bash scripts/vllm-gpu-run.sh engine       ... then the check's steps on vLLM itself (signatures, the
#                                             weight-offload experiment on the hybrid model, in-process unload)
#   bash scripts/vllm-gpu-run.sh backends,cancel  ... then the backends through moechat's manager (vllm:
#                                             load, chat, Stop, stats, plan vs measured, unload; vllm-offload;
#                                             cancel while loading)
# (any --steps value of scripts/vllm_gpu_check.py works: e.g. "offload" alone if "engine" ran out of time)
#
# /root persists only while the machine stays warm (30 s after a call ends), so the calls go back to
# back. What it prints and writes goes to $OUT (report.json, report.md, logs, pip freeze lists).
# docs/vllm.md ("Running it on the lent GPU machine") has the call sequence.
set -uo pipefail
cd "$(dirname "$0")/.."
STORE=${VLLM_PARTS:-/root/vllm-parts}
WHEELS=${VLLM_WHEELS:-/root/vllm-wheels}
VENV=${VLLM_VENV:-/root/vllm-venv}
CKPT=${VLLM_CHECKPOINT:-/root/qwen3-next-80b-4layers-fp8}
OUT=${OUT:-/tmp/vllm-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export MOECHAT_HOME=${MOECHAT_HOME:-/root/moechat-home} MOECHAT_VLLM_PYTHON="$VENV/bin/python"

shopt -s nullglob
for part in .whl-vllm/part-*/; do
    "$PY" scripts/vllm_wheelhouse.py store "$part" "$STORE" || exit 1
done
[ -f "$STORE/manifest.json" ] || { echo "no part stored yet: carry .whl-vllm/part-01 first"; exit 1; }

if [ ! -f "$VENV/.installed" ]; then
    missing=$("$PY" scripts/vllm_wheelhouse.py missing "$STORE") || exit 1
    if [ -n "$missing" ]; then
        echo "waiting for parts: $missing"
        exit 0
    fi
    "$PY" scripts/vllm_wheelhouse.py assemble "$STORE" "$WHEELS" || exit 1
    "$PY" -m pip list --format=freeze > "$OUT/image-pip-freeze.txt" 2>/dev/null
    echo "the image's packages (paste over scripts/gpu-image-packages.txt): $OUT/image-pip-freeze.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # A venv that sees the image's packages (torch 2.11.0 among them). python3 there is itself a venv
    # (/opt/torch/.venv), whose packages --system-site-packages does not reach: a .pth file adds them.
    "$PY" -m venv --without-pip --system-site-packages "$VENV" || exit 1
    image_site=$("$PY" -c 'import sysconfig; p=sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])')
    venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # addsitedir, not a bare path: the image's own .pth files are processed too
    for d in $image_site; do echo "import site; site.addsitedir('$d')"; done > "$venv_site/zz_gpu_image.pth"
    # the venv has no pip of its own: the image's pip (seen through the .pth) installs into the venv
    started=$(date +%s)
    "$VENV/bin/python" -m pip install --no-index --no-deps --no-compile -q "$WHEELS"/*.whl \
        2>&1 | tee "$OUT/pip-install.log" || exit 1
    "$VENV/bin/python" -m pip install --no-index --no-deps --no-build-isolation -q . \
        2>&1 | tee -a "$OUT/pip-install.log" || exit 1
    echo "installed in $(( $(date +%s) - started )) s"
    "$VENV/bin/python" -m pip list --format=freeze --path "$venv_site" > "$OUT/venv-pip-freeze.txt"
    echo "installed into $VENV: $(wc -l < "$OUT/venv-pip-freeze.txt") packages ($OUT/venv-pip-freeze.txt)"
    "$VENV/bin/python" -m pip check > "$OUT/pip-check.txt" 2>&1
    echo "pip check: $(wc -l < "$OUT/pip-check.txt") line(s), the first ones:"; head -20 "$OUT/pip-check.txt"
    "$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
        || { echo "vLLM does not import: see above; carry the optional parts too"; exit 1; }
    touch "$VENV/.installed"
fi

# another process may be writing it (scripts/gpu-session.sh does, in the background): wait for it
for _ in $(seq 100); do [ -d "$CKPT.partial" ] && [ ! -d "$CKPT" ] && sleep 3; done
if [ ! -d "$CKPT" ]; then
    started=$(date +%s)
    "$VENV/bin/python" -m moechat.backends.fp8_checkpoint "$CKPT" || exit 1
    echo "wrote $CKPT ($(du -sh "$CKPT" | cut -f1)) in $(( $(date +%s) - started )) s"
fi

steps=${1:-}
[ -n "$steps" ] || exit 0
name=${steps//,/-}
"$VENV/bin/python" scripts/vllm_gpu_check.py --model "$CKPT" --steps "$steps" --out "$OUT/check-$name" \
    2>&1 | tee "$OUT/check-$name.log"
