#!/usr/bin/env bash
# `make demo`: the local stack on its default ports in a throw-away data dir — up, status, down.
# (The full pipeline — import, fine-tune, quantize, evaluate, deploy, chat — lands here as it is built.)
set -euo pipefail

cd "$(dirname "$0")/.."
YARD=(.venv/bin/python -m cli.main)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

DATA_DIR="$(mktemp -d -t modelyard-demo.XXXXXX)"
cleanup() {
  local rc=$?
  "${YARD[@]}" down --data-dir "$DATA_DIR" >/dev/null 2>&1 || true
  if [ "$rc" -eq 0 ]; then rm -rf "$DATA_DIR"; else echo "demo: failed; logs kept in $DATA_DIR/logs" >&2; fi
}
trap cleanup EXIT

echo "== yard up --detach (data dir $DATA_DIR, default ports)"
# Fails with the name of the service and the port when a default port is taken.
"${YARD[@]}" up --detach --data-dir "$DATA_DIR"

echo "== yard status"
"${YARD[@]}" status --data-dir "$DATA_DIR"

echo "== yard down"
"${YARD[@]}" down --data-dir "$DATA_DIR"
echo "demo: ok"
