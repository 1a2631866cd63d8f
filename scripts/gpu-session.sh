#!/usr/bin/env bash
# Every GPU run the open work needs, in one session of the lent GPU machine (docs/gpu-session.md):
# moe-offload's loads at full width (bench/load_at_scale.py), the int4 kernels' check, vLLM's check
# through moechat (scripts/vllm_gpu_check.py), and llama.cpp next to moe-offload and vLLM
# (bench/llamacpp_gpu.py). The machine keeps /root only while warm (a call within ~30 s of the
# last), so the calls go back to back, and the long work runs in the background between them.
#
# Here, once (PyPI reachable):
#     python3 scripts/vllm_wheelhouse.py build ...   # the vLLM parts, .whl-vllm/part-01..07 (docs/vllm.md)
#     python3 bench/llamacpp_gpu.py pack              # llama.cpp's source and moechat's small wheels
# There:
#     call 1, carry .whl-vllm/part-07 and .llamacpp-gpu/part-01:   bash scripts/gpu-session.sh start
#     calls 2-7, carry .whl-vllm/part-01 .. part-06, one a call:   bash scripts/vllm-gpu-run.sh
#         (the call that completes the parts installs vLLM, ~1 min)
#     call 8:                                                       bash scripts/gpu-session.sh chain
#     then, until it prints "session done":                         bash scripts/gpu-session.sh wait 540
# Without vLLM (VLLM=0 on calls 1 and 8): no parts 2-7, and the comparison is moe-offload and llama.cpp.
# Issue 15's engine runs: ENGINE=1 on call 1 (CPU_BASELINE=FILE: an older cpu_experts.c timed beside;
# ROWS="hybrid-24 hybrid-16": those runs alone, in that order).
# VLLM=0 LLAMA=0 on call 1: phase A alone, no call 8 (`wait` until "session done").
# GPU_TESTS="tests/x.py -k cuda" on call 1 runs those tests there first (pytest from .gpu-wheels/,
# made here by `pip download pytest iniconfig pluggy packaging --no-deps -d .gpu-wheels`).
# Every `wait` leaves what is finished so far in $OUT/session.tgz (results and logs, no weights).
set -uo pipefail
cd "$(dirname "$0")/.."
S=${GPU_SESSION_DIR:-/root/gpu-session}
FP8=${VLLM_CHECKPOINT:-/root/qwen3-next-80b-4layers-fp8}
SITE=$S/site                      # moechat and its small dependencies for the image's python3
BUDGETS=${BUDGETS:-"16 24 80"}     # 80: a whole H100, where vLLM's FP8 weights fit too
VLLM=${VLLM:-1}                    # 0: no vLLM (no parts to carry, no check, not in the comparison)
LLAMA=${LLAMA:-1}                  # 0: no llama.cpp build and no comparison (with VLLM=0: no phase B at all)
EXTRAS=${EXTRAS:-1}                # 0: phase A leaves out the int4 check, the conversion bench, the import profile
LOAD_FORMATS=${LOAD_FORMATS:-"fp8 bf16"}   # the release layouts phase A loads at full width
ENGINE=${ENGINE:-0}                # 1: phase A ends with issue 15's engine runs (engine_row below)
ROWS=${ROWS:-"hybrid-16 pcie-16 cpu-16 hybrid-24 cpu-kernel hybrid-16-router hybrid-16-8threads"}   # which, in order
LOADS=${LOADS:-1}                  # 0: no FP8 checkpoint and no loads at full width
GPU_TESTS=${GPU_TESTS:-}           # pytest arguments: the tests that need a GPU, first (carry .gpu-wheels: pytest)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# the copy of the tree there has no .git: pass the commit (MOECHAT_GIT_COMMIT=$(git rev-parse HEAD) here)
[ -n "${MOECHAT_GIT_COMMIT:-}" ] || MOECHAT_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null)
[ -n "$MOECHAT_GIT_COMMIT" ] && export MOECHAT_GIT_COMMIT
mkdir -p "$S"

in_background() {  # NAME COMMAND...: run in a session of its own (it outlives the call), log in $S/NAME.log
    local name=$1; shift
    setsid nohup bash -c "$*" > "$S/$name.log" 2>&1 < /dev/null &
    echo "started $name in the background ($S/$name.log)"
}

phase_a() {  # the GPU work that needs no vLLM: checkpoint, loads at full width, int4 kernels
    set -x
    unset OUT   # the starting call's $OUT is emptied for the next call: `wait` packs the results
    python3 scripts/vllm_wheelhouse.py store .llamacpp-gpu/part-01 /root/llamacpp-parts || return 1
    python3 bench/llamacpp_gpu.py assemble --store /root/llamacpp-parts || return 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" \
        /root/llamacpp-gpu/files/*.whl . || return 1
    export PYTHONPATH=$SITE MOECHAT_HOME=$S/home-a
    nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
    if [ -n "$GPU_TESTS" ]; then
        python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu-wheels/*.whl
        TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS > "$S/gpu-tests.log" 2>&1
        rc=$?; echo "gpu tests: rc $rc"
        # a broken stream must not cost the decode rows: they measure the cache's prefill instead
        [ $rc = 0 ] || { STREAM_ARGS=--no-prefill-stream; echo "engine rows: $STREAM_ARGS"; }
    fi
    if [ "$LOADS" = 1 ]; then
        [ -d "$FP8" ] || python3 -m moechat.backends.fp8_checkpoint "$FP8" || return 1
        touch "$S/checkpoint-ready"
        timeout 580 python3 bench/load_at_scale.py --root /root/load --out "$S/results/load" --formats $LOAD_FORMATS \
            --layers 2 4 --reuse "fp8:4=$FP8"
    fi
    if [ "$ENGINE" = 1 ]; then for row in $ROWS; do engine_row "$row"; done; fi
    if [ "$EXTRAS" = 1 ]; then
        timeout 240 python3 scripts/int4_gpu_check.py > "$S/int4-gpu-check.txt" 2>&1
        echo "int4 check: rc $?"
        timeout 120 python3 bench/convert_speed.py --experts 64 --json "$S/convert-speed.json" > "$S/convert-speed.txt" 2>&1
        echo "conversion speed: rc $?"
        # what the load stage "Reading the tokenizer" spends (docs/moe-offload.md, "Converting experts in batches")
        python3 -X importtime -c "import torch; from transformers import AutoTokenizer" 2> "$S/transformers-importtime.txt"
    fi
    return 0
}

engine_row() {  # NAME: one of issue 15's engine runs (docs/moe-offload.md, "Measured"), one process each
    local r=$S/results/engine t args
    mkdir -p "$r"
    case $1 in
        # uniform routing (a cache's worst case); the first run also measures the machine and the parts
        hybrid-16) t=230; args="--miss-policy hybrid --budgets 16 --skip check router" ;;
        pcie-16) t=150; args="--miss-policy pcie --budgets 16 --skip check router machine prefill" ;;
        cpu-16) t=150; args="--miss-policy cpu --budgets 16 --skip check router machine prefill" ;;
        hybrid-24) t=180; args="--miss-policy hybrid --budgets 24 --skip check router machine" ;;
        # the random model's router (no regression), with the step's logits per miss policy against transformers
        hybrid-16-router) t=450; args="--miss-policy hybrid --budgets 16 --skip uniform machine prefill" ;;
        # how the split adapts to fewer CPU threads (issue 15 item 4)
        hybrid-16-8threads) t=150; args="--miss-policy hybrid --budgets 16 --cpu-threads 8 --skip check router machine prefill" ;;
        cpu-kernel)  # the kernel against the memory, and the kernel of the last measured hybrid runs beside it
            timeout 120 python3 bench/cpu_experts_speed.py --threads 4 8 15 --runs 1 \
                ${CPU_BASELINE:+--baseline "$CPU_BASELINE"} --out "$r/cpu-experts.json" > "$S/cpu-experts.txt" 2>&1
            echo "cpu-kernel: rc $?"
            return ;;
        *) echo "no engine run is called $1"; return ;;
    esac
    timeout $t python3 bench/moe_offload_speed.py $args ${STREAM_ARGS:-} --out "$r/speed-$1.json" > "$S/speed-$1.log" 2>&1
    echo "$1: rc $?"
}

phase_b() {  # after phase A: llama.cpp builds (CPU) while vLLM's check runs (GPU); then one comparison
    set -x
    unset OUT
    while [ ! -f "$S/a.done" ]; do sleep 3; done
    [ "$LLAMA" = 1 ] && ( CMAKE_BUILD_PARALLEL_LEVEL=10 python3 bench/llamacpp_gpu.py prepare > "$S/llama-prepare.log" 2>&1
      echo "llama.cpp prepare: rc $?"; touch "$S/llama.ready" ) &
    also=()
    if [ "$VLLM" = 1 ]; then
        env -u PYTHONPATH OUT="$S/results/vllm" bash scripts/vllm-gpu-run.sh backends,cancel \
            > "$S/vllm-check.log" 2>&1
        echo "vLLM check: rc $?"
        also=(--also "vllm=$FP8")
    fi
    [ "$LLAMA" = 1 ] || return 0
    while [ ! -f "$S/llama.ready" ]; do sleep 3; done
    # budgets: $BUDGETS
    MOECHAT_VLLM_PYTHON=/root/vllm-venv/bin/python MOECHAT_HOME=$S/home-b python3 bench/llamacpp_gpu.py compare \
        --budgets $BUDGETS "${also[@]}" --per-run-s 200 --out "$S/results" --no-report > "$S/compare.log" 2>&1
    echo "comparison: rc $?"
}

pack_out() {  # whole or not at all (written aside, then renamed): a call cut short keeps the last pack
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/.session.tgz" -C "$S" --exclude='home-*' --exclude=site --exclude='*.gguf' \
        --exclude='*.safetensors' . 2>/dev/null && mv "$OUT/.session.tgz" "$OUT/session.tgz"
}

case "${1:-}" in
    start)
        [ -n "$MOECHAT_GIT_COMMIT" ] || echo "MOECHAT_GIT_COMMIT is not set: the results will name no commit"
        [ "$VLLM" = 0 ] || bash scripts/vllm-gpu-run.sh | tail -2    # stores the carried vLLM part
        done_too=""; [ "$VLLM$LLAMA" = 00 ] && done_too="; touch $S/session.done"   # no phase B
        in_background a "bash $0 _a; touch $S/a.done$done_too"
        ;;
    chain)
        [ "$VLLM" = 0 ] || [ -f /root/vllm-venv/.installed ] || { echo "vLLM is not installed yet: carry the missing parts (bash scripts/vllm-gpu-run.sh says which)"; exit 1; }
        in_background b "VLLM=$VLLM bash $0 _b; touch $S/session.done"
        ;;
    wait)
        limit=${2:-540}; started=$(date +%s)
        while [ ! -f "$S/session.done" ] && [ $(( $(date +%s) - started )) -lt "$limit" ]; do
            sleep 5
            [ $(( ($(date +%s) - started) % 30 )) -lt 5 ] && pack_out     # about every 30 s
        done
        date; ls "$S"
        for f in a gpu-tests b vllm-check llama-prepare compare; do
            [ -f "$S/$f.log" ] && { echo "--- $f"; tail -n 4 "$S/$f.log" | cut -c1-300; }
        done
        nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
        df -h /root | tail -1
        pack_out
        [ -f "$S/session.done" ] && echo "session done"
        ;;
    _a) phase_a ;;
    _b) phase_b ;;
    *) sed -n 2,17p "$0"; exit 2 ;;
esac
