"""Tool-call parsers: the names vLLM knows, and the one a model folder calls for.

vLLM reads tool calls out of the model's text with a parser picked by name (``--tool-call-parser``);
each model family writes its calls its own way (Hermes/Qwen2.5 ``<tool_call>{json}</tool_call>``,
Llama 3.x ``<|python_tag|>`` JSON, Mistral ``[TOOL_CALLS]`` ...). A deployment names one in
``options.tool_call_parser``, or leaves it empty and gets the one ``choose_tool_parser`` finds in
the model's chat template and added tokens; ``none`` (asked, or nothing found) means no parser.

No parser: ``tool_choice`` ``auto`` (the OpenAI default when ``tools`` are given) is refused with a
400 (the model's calls could not be read), while ``required`` and a named function still work, since
vLLM then constrains the answer to a JSON list of calls with structured outputs (the engine runs the
JSON-only parser ``NO_PARSER_ENGINE_NAME`` that ``vllm_server`` registers for that).

Runs in the inference service (no vLLM import); ``VLLM_TOOL_PARSERS`` is checked against vLLM's own
registry by ``tests/unit/test_tool_parsers.py`` when ``.venv-vllm`` exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NONE = "none"  # no tool-call parser
# The engine-side parser behind NONE: no calls read from free text, required/named answered as JSON.
NO_PARSER_ENGINE_NAME = "modelyard_json_only"

# vLLM 0.32's registered tool-call parsers (vllm/tool_parsers/__init__.py, _TOOL_PARSERS_TO_REGISTER).
VLLM_TOOL_PARSERS: tuple[str, ...] = (
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4",
    "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3", "glm45", "glm47", "granite",
    "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba",
    "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat",
    "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json",
    "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss", "step3", "step3p5",
    "xlam",
)
# The transformers engine reads Hermes-style calls only (always: it has no "none").
TRANSFORMERS_TOOL_PARSERS: tuple[str, ...] = ("hermes",)


@dataclass(frozen=True)
class Rule:
    """``parser`` when every one of ``markers`` is in the model's chat template (or, for ``tokens``
    rules, among its added tokens)."""

    parser: str
    markers: tuple[str, ...]
    tokens: bool = True  # the first marker alone as an added token is enough evidence too


# Most specific first: several families share ``<tool_call>``.
RULES: tuple[Rule, ...] = (
    Rule("mistral", ("[TOOL_CALLS]",)),
    Rule("llama3_json", ("<|python_tag|>",)),
    Rule("llama3_json", ("<|start_header_id|>", "ipython"), tokens=False),
    Rule("qwen3_coder", ("<tool_call>", "<function="), tokens=False),
    Rule("granite", ("<|tool_call|>",)),
    Rule("granite-20b-fc", ("<function_call>",)),
    Rule("internlm", ("<|plugin|>",)),
    Rule("jamba", ("<tool_calls>",)),
    Rule("lfm2", ("<|tool_call_start|>",)),
    Rule("functiongemma", ("<start_function_call>",)),
    Rule("phi4_mini_json", ("functools[",)),
    Rule("step3", ("<｜tool_calls_begin｜>",)),
    Rule("deepseek_v3", ("<｜tool▁calls▁begin｜>", "tool['type']"), tokens=False),
    Rule("deepseek_v31", ("<｜tool▁calls▁begin｜>",)),
    Rule("hermes", ("<tool_call>",)),
)


def valid_parsers(engine: str) -> tuple[str, ...]:
    """The values ``options.tool_call_parser`` may take on ``engine`` (besides empty: auto-chosen)."""
    return TRANSFORMERS_TOOL_PARSERS if engine == "transformers" else (*VLLM_TOOL_PARSERS, NONE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_templates(model_dir: Path) -> list[str]:
    """Every chat template of the model folder: ``chat_template.jinja``, ``chat_template.json`` and
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{name, template}``)."""
    model_dir = Path(model_dir)
    out: list[str] = []
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        out.append(jinja.read_text(encoding="utf-8", errors="replace"))
    for source in (_read_json(model_dir / "chat_template.json"), _read_json(model_dir / "tokenizer_config.json")):
        template = source.get("chat_template")
        if isinstance(template, str):
            out.append(template)
        elif isinstance(template, list):
            out += [t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    return out


def added_tokens(model_dir: Path) -> set[str]:
    """The added tokens of the tokenizer (``tokenizer_config.json``'s ``added_tokens_decoder`` and
    ``tokenizer.json``'s ``added_tokens``)."""
    model_dir = Path(model_dir)
    tokens: set[str] = set()
    decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder")
    if isinstance(decoder, dict):
        tokens |= {t["content"] for t in decoder.values() if isinstance(t, dict) and isinstance(t.get("content"), str)}
    added = _read_json(model_dir / "tokenizer.json").get("added_tokens")
    if isinstance(added, list):
        tokens |= {t["content"] for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)}
    return tokens


def parser_for(templates: list[str], tokens: set[str]) -> str:
    """The parser the first matching rule names (``NONE`` when none matches)."""
    text = "\n".join(templates)
    for rule in RULES:
        if all(m in text for m in rule.markers):
            return rule.parser
    for rule in RULES:
        if rule.tokens and rule.markers[0] in tokens:
            return rule.parser
    return NONE


def choose_tool_parser(model_dir: Path) -> str:
    """The tool-call parser for the model in ``model_dir``, from its chat template and added tokens;
    ``NONE`` when they show no tool-call format vLLM knows."""
    return parser_for(chat_templates(model_dir), added_tokens(model_dir))


def resolve_tool_parser(requested: str, engine: str, model_dir: Path) -> str:
    """The parser a deployment runs with: ``requested``, or the chosen one when it is empty (vLLM
    only; the transformers engine reads Hermes-style calls, which ``hermes`` names)."""
    if requested:
        return requested
    if engine == "transformers":
        return "hermes"
    return choose_tool_parser(model_dir)


def engine_parser_name(parser: str) -> str:
    """The name vLLM is started with for ``parser`` (``NONE`` runs the JSON-only parser)."""
    return NO_PARSER_ENGINE_NAME if parser == NONE else parser
