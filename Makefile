# moechat: `make run` sets up and serves the app; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860
MODEL ?=
BACKEND ?=
SET ?=
PLUGINS := $(wildcard plugins/*/pyproject.toml)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test system-deps vllm-env vllm-gpu-check bench-gpu bench-report clean

# A machine with an NVIDIA GPU gets PyPI's CUDA build of torch; a CPU-only one gets torch 2.13.0
# (a CPU wheel where one is provided locally, as on our CI machines).
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(PLUGINS)
	$(BIN)/pip install -q '$(TORCH_SPEC)'
	$(BIN)/pip install -q -e '.[app,test]'
	for p in $(dir $(PLUGINS)); do $(BIN)/pip install -q --no-deps -e $$p || exit 1; done
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the browser tests (Playwright drives it; it downloads no browser).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

run: install
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/moechat serve --host $(HOST) --port $(PORT) \
		$(if $(MODEL),--model '$(MODEL)') $(if $(BACKEND),--backend '$(BACKEND)') \
		$(foreach s,$(SET),--set '$(s)')

test: install system-deps
	$(BIN)/python bench/llamacpp_gpu.py download  # llama.cpp's GGUF converter, for tests/test_llamacpp_gpu_script.py
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# vLLM needs its own environment (it pins a CUDA torch): see docs/vllm.md.
vllm-env:
	bash scripts/make-vllm-env.sh

# On a GPU machine with the vLLM environment: runs both vLLM backends and writes what it saw.
vllm-gpu-check: install
	$(BIN)/python scripts/vllm_gpu_check.py

# The comparison set on a GPU machine (under 10 minutes): see docs/benchmarks.md.
bench-gpu: install
	MOECHAT_GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null) PYTHON=$(BIN)/python bash bench/gpu_compare.sh

bench-report: install
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
