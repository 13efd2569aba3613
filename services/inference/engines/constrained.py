"""Constrained decoding for the transformers engine, with xgrammar.

xgrammar is the default structured-output backend of vLLM, so both engines take the same schemas
(``json_schema_support`` refuses what it does not enforce, before either engine sees the request).
The engine builds one ``Constraints`` (tokenizer info, compiler with its cache); a request compiles
its grammar (``json_schema`` / ``json_object`` / ``tool_calls``) off the event loop; every choice of
the request gets its own ``Matcher`` in the scheduler, which masks the logits of that row before
sampling and advances with the sampled token. Rows without a constraint are untouched, so
constrained and free requests share a batch.
"""

from __future__ import annotations

from typing import Any

import torch

from .scheduler import RequestError
from .tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolSpec

# The text around each call's arguments, as Hermes / Qwen2.5 models write a call (json.dumps spacing).
_CALL_BEGIN = TOOL_CALL_START + '\n{"name": "'
_ARGUMENTS = '", "arguments": '
_CALL_END = "}\n" + TOOL_CALL_END


class ConstraintError(RequestError):
    """The grammar could not be built from the request (its schema), with the field to name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class Constraints:
    """xgrammar for one model: the tokenizer's info and a compiler (with its grammar cache)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)

    # -- compile (blocking: call through asyncio.to_thread)

    def json_schema(self, schema: Any, param: str = "response_format.json_schema.schema") -> Grammar:
        try:
            return Grammar(self._compiler.compile_json_schema(_schema_text(schema)), self)
        except (RuntimeError, ValueError) as exc:
            raise ConstraintError(param, f"the schema cannot be compiled: {_first_line(exc)}") from None

    def json_object(self) -> Grammar:
        return Grammar(self._compiler.compile_json_schema('{"type": "object"}', strict_mode=False), self)

    def tool_calls(self, spec: ToolSpec) -> Grammar:
        """``tool_choice`` required (one call or more; one if parallel_tool_calls is false) or a
        named function (exactly one call of it), each call's arguments following its parameters."""
        tools = [t for t in spec.tools if spec.choice != "named" or t["function"]["name"] == spec.name]
        tags = [
            {
                "type": "tag",
                "begin": _CALL_BEGIN + t["function"]["name"] + _ARGUMENTS,
                "content": {
                    "type": "json_schema",
                    "json_schema": t["function"].get("parameters") or {"type": "object", "properties": {}},
                },
                "end": _CALL_END,
            }
            for t in tools
        ]
        if spec.choice == "named" or not spec.parallel:
            fmt: dict[str, Any] = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
        try:
            compiled = self._compiler.compile_structural_tag({"type": "structural_tag", "format": fmt})
        except (RuntimeError, ValueError) as exc:
            raise ConstraintError("tools", f"the tools' parameters cannot be compiled: {_first_line(exc)}") from None
        return Grammar(compiled, self)


class Grammar:
    """A compiled grammar; ``matcher()`` gives each choice its own state."""

    def __init__(self, compiled: Any, owner: Constraints) -> None:
        self._compiled = compiled
        self._owner = owner

    def matcher(self) -> Matcher:
        return Matcher(self._owner._xgr, self._compiled, self._owner.vocab_size)


class Matcher:
    """The grammar state of one sequence: ``mask`` before sampling, ``accept`` the sampled token."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row of logits with every token the grammar forbids next set to -inf."""
        out = logits.clone().unsqueeze(0)
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        self._xgr.apply_token_bitmask_inplace(out, self._bitmask, vocab_size=out.shape[-1])
        return out[0]

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


def _schema_text(schema: Any) -> str:
    import json

    return json.dumps(schema)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
