"""Tool calls on the transformers engine: the request's ``tools`` / ``tool_choice`` checked, and the
Hermes-style calls a model writes (``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
the format of Qwen2.5, Hermes and most chat templates with tools) read into OpenAI ``tool_calls``.

``ToolCallStream`` reads a choice's text as it is generated: text before a call goes out as content
as soon as it cannot be the start of ``<tool_call>``; a call goes out when its closing tag arrives,
in OpenAI's streamed shape (one delta with index, id, type and name and ``arguments: ""``, then one
with the arguments). A non-streamed answer goes through the same reader, so the two agree. A call
whose JSON does not parse stays in the content, as the model wrote it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import InvalidArgument

from ..json_schema_support import check_schema
from .scheduler import RequestError

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolRequestError(RequestError):
    """A bad ``tools`` / ``tool_choice`` (HTTP 400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class ToolSpec:
    """What the request asks: ``choice`` is none, auto, required or named (then ``name``)."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "none"
    name: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def constrains(self) -> bool:
        return bool(self.tools) and self.choice in ("required", "named")


def resolve(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None = None) -> ToolSpec:
    """Check ``tools`` and ``tool_choice`` (raising ``ToolRequestError`` naming the field) and say what to do."""
    checked = _check_tools(tools)
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        return ToolSpec(checked, "auto" if checked else "none", parallel=parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolRequestError("tool_choice", f"must be none, auto, required or a function, got {tool_choice!r}")
        if tool_choice in ("auto", "required") and not checked:
            raise ToolRequestError("tool_choice", f"{tool_choice!r} needs a non-empty tools list")
        spec = ToolSpec(checked, tool_choice, parallel=parallel)
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolRequestError("tool_choice", 'a named choice is {"type": "function", "function": {"name": ...}}')
        names = [t["function"]["name"] for t in checked]
        if fn["name"] not in names:
            raise ToolRequestError(
                "tool_choice.function.name",
                f"function {fn['name']!r} is not among the tools ({', '.join(names) or 'none given'})",
            )
        spec = ToolSpec(checked, "named", name=fn["name"], parallel=parallel)
    else:
        raise ToolRequestError("tool_choice", "must be a string or an object")
    if spec.constrains:  # their parameters become a grammar: refuse what it would not enforce
        for i, tool in enumerate(checked):
            if spec.choice == "named" and tool["function"]["name"] != spec.name:
                continue
            if "parameters" in tool["function"]:
                try:
                    check_schema(tool["function"]["parameters"], f"tools[{i}].function.parameters")
                except InvalidArgument as exc:
                    field_name = exc.violations[0].field if exc.violations else "tools"
                    raise ToolRequestError(field_name, str(exc).removeprefix(f"{field_name}: ")) from None
    return spec


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolRequestError("tools", "must be a list")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ToolRequestError(f"tools[{i}]", "must be an object")
        if tool.get("type", "function") != "function":
            raise ToolRequestError(f"tools[{i}].type", f"only function tools are supported, got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolRequestError(f"tools[{i}].function", "must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolRequestError(f"tools[{i}].function.name", "must be 1-64 letters, digits, _ or -")
        if name in seen:
            raise ToolRequestError(f"tools[{i}].function.name", f"{name!r} is given twice")
        seen.add(name)
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolRequestError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        if "parameters" in fn and fn["parameters"].get("type", "object") != "object":
            raise ToolRequestError(f"tools[{i}].function.parameters", "must describe an object (type: object)")
    return tools


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: an assistant's tool-call ``arguments`` as objects
    (OpenAI sends JSON strings; templates render them with ``tojson``), as vLLM does."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if not calls:
            out.append(m)
            continue
        fixed = []
        for c in calls:
            fn = dict(c.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # left as written; the template renders the string
            fixed.append({**c, "function": fn})
        out.append({**m, "tool_calls": fixed})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Reads one choice's text and returns OpenAI deltas (``{"content": ...}`` or ``{"tool_calls": [...]}``)."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                at = self._buf.find(TOOL_CALL_START)
                if at < 0:
                    # held back: what may be the start of a call, and the whitespace before it
                    keep = _partial_suffix(self._buf, TOOL_CALL_START)
                    keep += _trailing_space(self._buf[: len(self._buf) - keep])
                    self._content(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                self._content(self._buf[:at].rstrip(), out)
                self._buf = self._buf[at + len(TOOL_CALL_START) :]
                self._in_call = True
            else:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    return out
                body, self._buf = self._buf[:end], self._buf[end + len(TOOL_CALL_END) :]
                self._in_call = False
                out.extend(self._call(body, closed=True))

    def finish(self) -> list[dict[str, Any]]:
        """The rest at the end of the choice (an unclosed call is read if its JSON is whole)."""
        out: list[dict[str, Any]] = []
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            out.extend(self._call(rest, closed=False))
        elif rest.strip() or not self.calls:
            self._content(rest, out)
        return out

    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        if text and not (self.calls and not text.strip()):
            out.append({"content": text})

    def _call(self, body: str, *, closed: bool) -> list[dict[str, Any]]:
        call = _parse_call(body)
        if call is None:
            raw = TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")
            return [{"content": raw}]
        name, arguments = call
        index = self.calls
        self.calls += 1
        return [
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            },
            {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]},
        ]


def _parse_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _partial_suffix(text: str, token: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``token``."""
    for k in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip())


def collect(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer read at once: its content (None when empty) and its tool calls (OpenAI shape)."""
    reader = ToolCallStream()
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in [*reader.feed(text), *reader.finish()]:
        merge_delta(delta, content, calls)
    return ("".join(content) or None), [calls[i] for i in sorted(calls)]


def merge_delta(delta: dict[str, Any], content: list[str], calls: dict[int, dict[str, Any]]) -> None:
    """Add one streamed delta to an answer being put together (OpenAI's rules: the first delta of a
    call carries its id, type and name; the rest append to its arguments)."""
    if delta.get("content"):
        content.append(delta["content"])
    for t in delta.get("tool_calls") or []:
        call = calls.setdefault(t["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = t.get("id") or call["id"]
        fn = t.get("function") or {}
        call["function"]["name"] = fn.get("name") or call["function"]["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
