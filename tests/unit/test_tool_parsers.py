"""Tool-call parser choice from real chat templates, the engine command it gives, and the static
list of vLLM's parsers checked against the installed vLLM (``.venv-vllm``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.inference.engines.base import EngineOptions, EngineSpec
from services.inference.engines.tool_parsers import (
    NO_PARSER_ENGINE_NAME,
    NONE,
    VLLM_TOOL_PARSERS,
    choose_tool_parser,
    resolve_tool_parser,
    valid_parsers,
)
from services.inference.engines.vllm_engine import VllmEngine

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"

# Excerpts of the real templates (tokenizer_config.json ``chat_template``) of each family.
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions "
    "to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- endif %}"
)
QWEN3_CODER = (
    "{%- if tools %}<tools>{% for tool in tools %}<function>\\n<name>{{ tool.name }}</name>{% endfor %}</tools>"
    "If you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n"
    "<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n"
    "</tool_call>{%- endif %}"
)
LLAMA31 = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not "
    "none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n"
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }}{%- endif %}\n"
    "{%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "{{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}"
)
LLAMA32_NO_TAG = (  # Llama 3.2 1B/3B: JSON calls, no <|python_tag|> in the template
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{%- if tools is not none %}"
    "{{- \"Environment: ipython\\n\" }}{%- endif %}"
)
MISTRAL = (
    "{%- for message in loop_messages %}{%- if message[\"role\"] == \"user\" %}{%- if tools is not none and "
    "(message == user_messages[-1]) %}{{- \"[AVAILABLE_TOOLS] [\" }}{%- endif %}{{- \"[INST] \" + "
    "message[\"content\"] + \"[/INST]\" }}{%- elif message.tool_calls is defined and message.tool_calls is not "
    "none %}{{- \"[TOOL_CALLS] [\" }}{%- endif %}{%- endfor %}"
)
GRANITE3 = (
    "{%- if tools %}{{- '<|start_of_role|>available_tools<|end_of_role|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant_tool_call' %}{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>'"
    " + message['content'] + '<|end_of_text|>\\n' }}"
)
INTERNLM2 = (
    "{% if tools %}{{ '<|im_start|>system name=<|plugin|>\\n' + tools | tojson + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|action_start|><|plugin|>\\n' }}"
)
JAMBA = "{%- if message.tool_calls %}{{ '<tool_calls>' + message.tool_calls | tojson + '</tool_calls>' }}{%- endif %}"
PHI4_MINI = "{% if message['tools'] %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %} functools[...]"
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
)


def model_folder(path: Path, template: str | list | None = None, *, jinja: str | None = None,
                 added: tuple[str, ...] = ()) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config: dict = {"added_tokens_decoder": {str(i): {"content": t, "special": False} for i, t in enumerate(added)}}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


@pytest.mark.parametrize(("template", "parser"), [
    (QWEN25, "hermes"), (QWEN3_CODER, "qwen3_coder"), (LLAMA31, "llama3_json"), (LLAMA32_NO_TAG, "llama3_json"),
    (MISTRAL, "mistral"), (GRANITE3, "granite"), (INTERNLM2, "internlm"), (JAMBA, "jamba"),
    (PHI4_MINI, "phi4_mini_json"), (SMOLLM2, NONE),
])
def test_parser_is_chosen_from_the_chat_template(tmp_path, template, parser):
    assert choose_tool_parser(model_folder(tmp_path, template)) == parser
    assert parser == NONE or parser in VLLM_TOOL_PARSERS


def test_templates_are_read_from_every_place_a_model_folder_keeps_them(tmp_path):
    assert choose_tool_parser(model_folder(tmp_path / "jinja", jinja=QWEN25)) == "hermes"
    named = [{"name": "default", "template": SMOLLM2}, {"name": "tool_use", "template": LLAMA31}]
    assert choose_tool_parser(model_folder(tmp_path / "list", named)) == "llama3_json"
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL}))
    assert choose_tool_parser(tmp_path / "json") == "mistral"


def test_added_tokens_alone_choose_a_parser_and_nothing_chooses_none(tmp_path):
    assert choose_tool_parser(model_folder(tmp_path / "a", SMOLLM2, added=("<tool_call>", "</tool_call>"))) == "hermes"
    assert choose_tool_parser(model_folder(tmp_path / "b", None, added=("[TOOL_CALLS]",))) == "mistral"
    tok = tmp_path / "c"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 5, "content": "<|python_tag|>"}]}))
    assert choose_tool_parser(tok) == "llama3_json"
    assert choose_tool_parser(tmp_path / "missing") == NONE
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    assert choose_tool_parser(tmp_path / "broken") == NONE


def test_a_named_parser_is_kept_and_the_transformers_engine_reads_hermes(tmp_path):
    folder = model_folder(tmp_path, SMOLLM2)
    assert resolve_tool_parser("", "vllm", folder) == NONE
    assert resolve_tool_parser("pythonic", "vllm", folder) == "pythonic"
    assert resolve_tool_parser("", "transformers", folder) == "hermes"
    assert valid_parsers("transformers") == ("hermes",)
    assert NONE in valid_parsers("vllm") and "hermes" in valid_parsers("vllm")


def engine(tmp_path: Path, parser: str) -> VllmEngine:
    spec = EngineSpec(deployment="d", model_dir=tmp_path, served_model_name="m", port=1, workdir=tmp_path,
                      options=EngineOptions(tool_call_parser=parser))
    return VllmEngine(spec, vllm_python=tmp_path / "python")


def test_vllm_command_enables_the_resolved_parser(tmp_path):
    cmd = engine(tmp_path, "hermes").command()
    assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in cmd
    cmd = engine(tmp_path, NONE).command()
    assert cmd[cmd.index("--tool-call-parser") + 1] == NO_PARSER_ENGINE_NAME


def test_auto_tool_choice_without_a_parser_is_refused_naming_tool_choice(tmp_path):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    no_parser = engine(tmp_path, NONE)
    for body in ({"tools": tools}, {"tools": tools, "tool_choice": "auto"}):
        with pytest.raises(InvalidArgument) as err:
            no_parser.check_tool_choice(body)
        assert err.value.violations[0].field == "tool_choice" and "--tool-call-parser" in err.value.message
    for body in ({"tools": tools, "tool_choice": "required"}, {"tools": tools, "tool_choice": "none"},
                 {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}, {}):
        no_parser.check_tool_choice(body)
    engine(tmp_path, "hermes").check_tool_choice({"tools": tools})


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing)")
def test_static_parser_list_matches_the_installed_vllm():
    out = subprocess.run(
        [str(VLLM_PYTHON), "-c", "from vllm.tool_parsers import ToolParserManager as m; print('\\n'.join("
                                 "sorted(set(m.list_registered()))))"],
        capture_output=True, text=True, timeout=120, check=True, env={"VLLM_NO_USAGE_STATS": "1", "PATH": "/usr/bin"})
    assert sorted(VLLM_TOOL_PARSERS) == out.stdout.split()
