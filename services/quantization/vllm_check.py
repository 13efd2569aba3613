"""Load a quantized checkpoint in vLLM, score it and generate once:
``<.venv-vllm>/bin/python -m services.quantization.vllm_check MODEL_DIR SOURCE_TOP1.json PROMPT_JSON EVENT_FD``.

Runs in the vLLM engine's virtualenv (imports nothing of ModelYard). SOURCE_TOP1.json holds the
held-out windows the quantizer scored the source on and the source's top-1 next tokens; vLLM's prompt
log-probabilities on the same windows give the quantized model's perplexity and its top-1 agreement.
Events on EVENT_FD as in ``quantizer.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    model_dir, top1_path, prompt = argv[0], Path(argv[1]), json.loads(argv[2])
    events = os.fdopen(int(argv[3]), "w", encoding="utf-8")

    def send(kind: str, **fields: Any) -> None:
        events.write(json.dumps({"t": kind, **fields}) + "\n")
        events.flush()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reference = json.loads(top1_path.read_text())
    chunks, source_top = reference["chunks"], reference["top1"]
    send("progress", fraction=0.0, phase="loading in vLLM")
    llm = LLM(
        model=model_dir,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=max(512, max(map(len, chunks)) + 8),
        max_num_seqs=4,
        seed=0,
    )
    send("progress", fraction=0.5, phase="scoring in vLLM")
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=c) for c in chunks],
        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0),
        use_tqdm=False,
    )
    nll, count, agree = 0.0, 0, 0
    for chunk, ref, out in zip(chunks, source_top, outs, strict=True):
        for pos in range(1, len(chunk)):
            logprobs = out.prompt_logprobs[pos]
            nll -= logprobs[chunk[pos]].logprob
            top = min(logprobs.items(), key=lambda kv: kv[1].rank)[0]
            agree += int(top == ref[pos - 1])
            count += 1
    tokenizer = llm.get_tokenizer()
    text = (
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else prompt[-1]["content"]
    )
    answer = llm.generate([text], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)[0].outputs[0]
    if not answer.token_ids:
        send("error", reason="GENERATION_EMPTY", message="the quantized model generated no token in vLLM")
        return 2
    send(
        "result",
        quantized_perplexity=math.exp(nll / max(1, count)),
        top1_agreement=agree / max(1, count),
        answer=answer.text,
        eval_tokens=count,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:  # noqa: BLE001 - the job reports the traceback's last line
        traceback.print_exc()
        sys.exit(1)
