#!/usr/bin/env bash
# Creates the evaluation benchmark's virtualenv (default .venv-bench), separate from .venv because
# lm-evaluation-harness pins its own datasets/evaluate/scikit-learn stack. bench/eval_throughput.py runs
# `<venv>/bin/python bench/lmeval_runner.py` from it, against a deployment's OpenAI completions endpoint.
#
# torch 2.13.0 (CPU build, from the local wheel directory) first, then the frozen set of
# requirements/bench-eval.txt (lm-eval 0.4.13 with its `api` extra and transformers for the tokenizer)
# with torch held by constraint; CUDA builds of torchvision/torchaudio that a dependency might pull in
# are removed (they would fail to import against the CPU torch). The venv works offline:
# lm-eval reads the BBH tasks from local JSON and the tokenizer from a local model folder.
#
# Usage: bash scripts/setup_bench_eval.sh [VENV_DIR]      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-bench}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip==26.3
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" >"$constraints"
"${PIP[@]}" install "torch==${TORCH_VERSION}"
"${PIP[@]}" install -c "$constraints" -r requirements/bench-eval.txt
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

# Smoke check: the harness, its OpenAI-completions model and the tokenizer backend import offline
# (fails here, not in the first benchmark run).
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 "$VENV/bin/python" -c "
import importlib.metadata as md
import lm_eval, lm_eval.models.openai_completions, transformers, torch  # noqa: F401
print(' '.join(f'{p} {md.version(p)}' for p in ('lm_eval', 'transformers', 'datasets', 'torch')))"
echo "engine-bench-eval: $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
