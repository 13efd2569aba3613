#!/usr/bin/env bash
# Runs the pinned buf CLI on the workspace in buf.yaml (our protos under
# protos/modelyard; vendored google/rpc protos under protos/third_party).
# Usage: bash scripts/buf.sh lint | format -d | breaking --against ... | <any buf command>
# buf is installed with npm into .tools/ on first use.
set -euo pipefail

BUF_VERSION="1.75.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BUF="$TOOLS/node_modules/.bin/buf"

if [[ $# -eq 0 ]]; then
  echo "usage: bash scripts/buf.sh <buf command> [args...]   e.g. lint" >&2
  exit 2
fi

if [[ ! -x "$BUF" ]] || [[ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
  command -v npm >/dev/null || { echo "scripts/buf.sh: npm is required to install buf" >&2; exit 1; }
  echo "installing @bufbuild/buf@$BUF_VERSION into .tools/" >&2
  npm install --prefix "$TOOLS" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" >&2
fi

cd "$ROOT"
exec "$BUF" "$@"
