#!/usr/bin/env bash
# Creates the quantizers' virtualenv (default .venv-quant), separate from .venv because llm-compressor
# pins transformers <= 5.17 and AutoAWQ pulls triton. The quantization job runs
# `<venv>/bin/python -m services.quantization.quantizer` from it.
#
# torch 2.13.0 (CPU build, from the local wheel directory) first, then the frozen set of
# requirements/quant-cpu.txt with torch held by constraint (GPTQModel 7.7 would pull a CUDA torch:
# 7.6 is pinned). On a GPU machine the same set is installed; bitsandbytes is added there.
#
# Usage: bash scripts/setup_quant.sh [VENV_DIR]      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-quant}"
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
"${PIP[@]}" install -c "$constraints" -r requirements/quant-cpu.txt
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" install -c "$constraints" "bitsandbytes==0.50.2"
fi

# Smoke check: every quantizer imports (fails here, not in the first job).
OMP_NUM_THREADS=1 "$VENV/bin/python" -c "
import importlib.metadata as md
import llmcompressor, gptqmodel, awq  # noqa: F401
print(' '.join(f'{p} {md.version(p)}' for p in ('llmcompressor', 'compressed-tensors', 'gptqmodel', 'autoawq', 'transformers')))"
echo "engine-quant: $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
