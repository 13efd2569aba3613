"""OpenAI request and response models (pydantic), as the OpenAI API and its SDK define them.

Requests validate every field's type and range, so a bad request is a 400 naming the field;
unknown extra fields are ignored (vendor extensions from other clients). Responses are built
with every field OpenAI always sends (nulls included).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic_core import to_json

from services.core.errors import InvalidArgument

from .settings import LimitSettings

Role = Literal["system", "user", "assistant", "tool", "developer"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def check_model_name(model: str, limits: LimitSettings) -> None:
    """400 naming ``model`` when it is longer than ``limits.max_model_chars`` (no deployment name is:
    such a string never reaches a log line, a metric or the routing table)."""
    if len(model) > limits.max_model_chars:
        raise InvalidArgument.for_field(
            "model", f"at most {limits.max_model_chars} characters (limits.max_model_chars), got {len(model)}"
        )


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageUrl(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    """An image (``gateway/images.py`` reads its URL)."""

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Request):
    name: str
    arguments: str = ""


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None

    def text(self) -> str:
        """The message's text (its text parts joined; image parts have none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(part.type == "image_url" for part in self.content)


class ResponseFormatIn(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# The engine's fields are int32 (SamplingParams, prompt_token_ids): larger values are a 400, not a 500.
INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Sampling(_Request):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # the engine's int64
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past an end-of-sequence token

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def check_limits(self, limits: LimitSettings) -> None:
        """The gateway's configured caps (``limits``), each a 400 naming its field."""
        check_model_name(self.model, limits)
        if self.n > limits.max_n:
            raise InvalidArgument.for_field("n", f"at most {limits.max_n} choices (limits.max_n), got {self.n}")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormatIn | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field that set ``max_new_tokens`` (named by an error about it)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=0, le=INT32_MAX)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("at least one prompt, and no empty token list")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def check_limits(self, limits: LimitSettings) -> None:
        super().check_limits(limits)
        count = len(self.prompts())
        if count > limits.max_prompts:
            raise InvalidArgument.for_field(
                "prompt", f"at most {limits.max_prompts} prompts in one request (limits.max_prompts), got {count}"
            )

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text or token ids (a flat list of ints is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(cast("list[str] | list[list[int]]", prompt))


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(p, str) for p in value):
            raise ValueError("token-id inputs are not supported; send text")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check_limits(self, limits: LimitSettings) -> None:
        check_model_name(self.model, limits)
        if isinstance(self.input, list) and len(self.input) > limits.max_prompts:
            raise InvalidArgument.for_field(
                "input",
                f"at most {limits.max_prompts} inputs in one request (limits.max_prompts), got {len(self.input)}",
            )


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TopLogprobOut(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class _NoNulls(BaseModel):
    """Serialized without its unset (None) fields, as OpenAI streams tool-call deltas: the first delta of
    a call has ``id``, ``type`` and ``function.name``, the next ones only ``function.arguments``."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_NoNulls):
    name: str | None = None
    arguments: str


class ToolCallDeltaOut(_NoNulls):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelyard"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# ---------------------------------------------------------------- pre-serialized stream chunks
# A stream sends one chunk per engine message; serializing each through the models above costs more
# than the rest of the message's path. The bytes are instead joined from parts that pydantic
# serialized once (the envelope once per stream, each choice shape once per process), so they are
# exactly what ``model_dump_json`` of the whole chunk gives.

_SLOT = "\x00"  # a value pydantic writes as "\u0000", which nothing else in a choice's JSON contains
_SLOT_JSON = b'"\\u0000"'


def _around(data: bytes, marker: bytes) -> tuple[bytes, bytes]:
    """``data`` before and after its first ``marker`` (which must be there)."""
    at = data.index(marker)
    return data[:at], data[at + len(marker) :]


class ChunkEnvelope:
    """One stream's chunk JSON around its choices, as an SSE event (``data: ...\\n\\n``)."""

    def __init__(self, empty: ChatCompletionChunk | Completion, exclude: set[str] | None) -> None:
        data = b"data: " + empty.model_dump_json(exclude=exclude).encode() + b"\n\n"
        # the first '"choices":[]' is the field: inside a JSON string a quote is always escaped
        head, tail = _around(data, b'"choices":[]')
        self._head, self._tail = head + b'"choices":[', b"]" + tail

    def event(self, choices: list[bytes]) -> bytes:
        """The event of the chunk with these choices (each its ``model_dump_json`` bytes)."""
        return self._head + b",".join(choices) + self._tail


@lru_cache(maxsize=4096)
def _chat_choice_parts(index: int, role: bool, finish: FinishReason | None) -> tuple[bytes, bytes]:
    choice = ChatChunkChoice(
        index=index, delta=ChatDelta(role="assistant" if role else None, content=_SLOT), finish_reason=finish
    )
    return _around(choice.model_dump_json().encode(), _SLOT_JSON)


def chat_choice_json(index: int, role: bool, content: str | None, finish: FinishReason | None) -> bytes:
    """A ChatChunkChoice without tool calls or logprobs, as its ``model_dump_json()`` bytes."""
    head, tail = _chat_choice_parts(index, role, finish)
    return head + to_json(content) + tail


@lru_cache(maxsize=4096)
def _completion_choice_parts(index: int, finish: FinishReason | None) -> tuple[bytes, bytes]:
    choice = CompletionChoice(index=index, text=_SLOT, logprobs=None, finish_reason=finish)
    return _around(choice.model_dump_json().encode(), _SLOT_JSON)


def completion_choice_json(index: int, text: str, finish: FinishReason | None) -> bytes:
    """A CompletionChoice without logprobs, as its ``model_dump_json()`` bytes."""
    head, tail = _completion_choice_parts(index, finish)
    return head + to_json(text) + tail
