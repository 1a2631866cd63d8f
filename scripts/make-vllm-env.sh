#!/usr/bin/env bash
# Build the environment the vllm and vllm-offload backends run in (`make vllm-env` calls this).
#
# vLLM pins its own torch (CUDA build) and transformers, so it cannot share the app's
# environment. This environment gets vLLM, the worker's four small dependencies and moechat itself
# (without its dependencies), so the worker process imports `moechat.backends` there.
#
#   VLLM_VENV      where to build it            (default: vllm-venv in moechat's data folder)
#   VLLM_VERSION   which vLLM to install        (default: 0.33.0; 0.28 or newer for weight offload)
#   PYTHON         the Python to build it from  (default: python3; vLLM wants 3.10 to 3.13)
#   PIP_ARGS       extra pip arguments, e.g. "--find-links /wheels --no-index" on an offline box
#
# Elsewhere than the default place, point moechat at it: MOECHAT_VLLM_PYTHON=$VLLM_VENV/bin/python
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_VENV="$("$ROOT/.venv/bin/python" -c 'from moechat.backends.machine import data_dir; print(data_dir() / "vllm-venv")')"
VENV="${VLLM_VENV:-$DEFAULT_VENV}"
VERSION="${VLLM_VERSION:-0.33.0}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<< "${PIP_ARGS:-}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "note: no NVIDIA GPU visible here; the environment builds, but vLLM will only run on a CUDA GPU." >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV from $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip "${EXTRA[@]}"
"$VENV/bin/python" -m pip install "vllm==$VERSION" pluggy pydantic loguru psutil platformdirs "${EXTRA[@]}"
"$VENV/bin/python" -m pip install --no-deps -e "$ROOT" "${EXTRA[@]}"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util as u
missing = [n for n in ("vllm", "pluggy", "pydantic", "loguru", "psutil") if u.find_spec(n) is None]
if missing:
    raise SystemExit(f"still missing: {', '.join(missing)}")
print(f"vLLM {md.version('vllm')} with torch {md.version('torch')} and transformers {md.version('transformers')}")
PY
if [ "$VENV" = "$DEFAULT_VENV" ]; then
    echo "Done: the vllm backends use $VENV."
else
    echo "Done. Tell moechat where it is: export MOECHAT_VLLM_PYTHON=$VENV/bin/python"
fi
