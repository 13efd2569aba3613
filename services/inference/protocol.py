"""Translation between the inference protos and the engines' OpenAI JSON (requests and chunks)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import InvalidArgument
from services.core.status import to_status_proto

from .deployments import DeploymentView
from .engines.base import EngineOptions
from .json_schema_support import check_schema

ROLE_NAMES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant",
              pb.CHAT_ROLE_TOOL: "tool", pb.CHAT_ROLE_DEVELOPER: "developer"}
ROLES = {v: k for k, v in ROLE_NAMES.items()}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
          "content_filter": pb.FINISH_REASON_CONTENT_FILTER, "abort": pb.FINISH_REASON_STOP}
ENGINES = {pb.ENGINE_VLLM: "vllm", pb.ENGINE_TRANSFORMERS: "transformers"}
ENGINE_ENUMS = {v: k for k, v in ENGINES.items()}
DTYPES = {pb.DTYPE_UNSPECIFIED: "auto", pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_FLOAT16: "float16",
          pb.DTYPE_FLOAT32: "float32"}
DTYPE_ENUMS = {v: k for k, v in DTYPES.items()}
STATES = {"CREATING": pb.DEPLOYMENT_STATE_CREATING, "READY": pb.DEPLOYMENT_STATE_READY,
          "DEGRADED": pb.DEPLOYMENT_STATE_DEGRADED, "FAILED": pb.DEPLOYMENT_STATE_FAILED,
          "DELETING": pb.DEPLOYMENT_STATE_DELETING}


# ---------------------------------------------------------------------- deployments


def engine_name(engine: int) -> str:
    if engine not in ENGINES:
        raise InvalidArgument.for_field("deployment.engine", "required: ENGINE_VLLM or ENGINE_TRANSFORMERS")
    return ENGINES[engine]


def options_from_proto(o: pb.EngineOptions) -> EngineOptions:
    return EngineOptions(dtype=DTYPES.get(o.dtype, "auto"), max_model_len=o.max_model_len,
                         max_num_seqs=o.max_num_seqs, kv_cache_bytes=o.kv_cache_bytes,
                         tensor_parallel_size=o.tensor_parallel_size, max_lora_rank=o.max_lora_rank,
                         max_loras=o.max_loras, tool_call_parser=o.tool_call_parser)


def _timestamp(dt) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def deployment_to_proto(view: DeploymentView) -> pb.Deployment:
    rec, o = view.record, view.record.options
    msg = pb.Deployment(
        name=rec.name, model_version=rec.model_version,
        adapters=[pb.Adapter(alias=a.alias, model_version=a.model_version) for a in rec.adapters],
        engine=ENGINE_ENUMS[rec.engine],
        options=pb.EngineOptions(dtype=DTYPE_ENUMS.get(o.dtype, pb.DTYPE_UNSPECIFIED), max_model_len=o.max_model_len,
                                 max_num_seqs=o.max_num_seqs, kv_cache_bytes=o.kv_cache_bytes,
                                 tensor_parallel_size=o.tensor_parallel_size, max_lora_rank=o.max_lora_rank,
                                 max_loras=o.max_loras, tool_call_parser=o.tool_call_parser),
        replicas=rec.replicas, state=STATES[view.state.value], engine_endpoints=view.endpoints,
        create_time=_timestamp(rec.create_time), update_time=_timestamp(view.update_time),
        served_model_name=rec.model_name,
    )
    if view.error is not None:
        msg.error.CopyFrom(to_status_proto(view.error))
    return msg


# ---------------------------------------------------------------------- requests


def _json_field(text: str, field_name: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument.for_field(field_name, f"not valid JSON: {exc}") from None


def _sampling(s: pb.SamplingParams, body: dict[str, Any], *, chat: bool) -> None:
    for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "presence_penalty", "frequency_penalty"):
        if s.HasField(key):
            body[key] = getattr(s, key)
    if s.stop:
        body["stop"] = list(s.stop)
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.logprobs:
        top = s.top_logprobs if s.HasField("top_logprobs") else 0
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = top
        else:
            body["logprobs"] = top


def _response_format(rf: pb.ResponseFormat, body: dict[str, Any]) -> None:
    if rf.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        body["response_format"] = {"type": "json_object"}
    elif rf.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        schema = _json_field(rf.json_schema, "response_format.json_schema")
        check_schema(schema, "response_format.json_schema.schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": rf.json_schema_name or "response", "schema": schema, "strict": rf.strict}}


# Largest image the service passes to an engine (decoded bytes); the gateway's own limit is usually lower.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")


def _parts(m: pb.ChatMessage, where: str, max_image_bytes: int) -> list[dict[str, Any]]:
    """``m.parts`` as OpenAI content parts; images as base64 data URLs (what both engine servers read: the
    engines never fetch a URL)."""
    if m.content:
        raise InvalidArgument.for_field(f"{where}.content", "must be empty when parts are set")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(m.parts):
        kind = part.WhichOneof("kind")
        if kind == "text":
            out.append({"type": "text", "text": part.text})
        elif kind == "image":
            image, field = part.image, f"{where}.parts[{j}].image"
            if not image.data:
                raise InvalidArgument.for_field(f"{field}.data", "must not be empty")
            if len(image.data) > max_image_bytes:
                raise InvalidArgument.for_field(f"{field}.data", f"the image has {len(image.data)} bytes; at most "
                                                                 f"{max_image_bytes} are accepted")
            mime = image.mime_type or "image/png"
            if mime not in IMAGE_MIME_TYPES:
                raise InvalidArgument.for_field(f"{field}.mime_type", f"must be one of {', '.join(IMAGE_MIME_TYPES)}, "
                                                                      f"got {mime!r}")
            url: dict[str, Any] = {"url": f"data:{mime};base64,{base64.b64encode(image.data).decode()}"}
            if image.detail:
                url["detail"] = image.detail
            out.append({"type": "image_url", "image_url": url})
        else:
            raise InvalidArgument.for_field(f"{where}.parts[{j}]", "set text or image")
    return out


def first_image_field(messages: Any, field_name: str = "messages") -> str | None:
    """The field of the first image part of ``messages`` (``messages[0].parts[1].image``), None without images."""
    for i, m in enumerate(messages):
        for j, part in enumerate(m.parts):
            if part.WhichOneof("kind") == "image":
                return f"{field_name}[{i}].parts[{j}].image"
    return None


def _message(m: pb.ChatMessage, i: int, field_name: str = "messages",
             max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    if m.role not in ROLE_NAMES:
        raise InvalidArgument.for_field(f"{field_name}[{i}].role", "required")
    content: str | list[dict[str, Any]] = _parts(m, f"{field_name}[{i}]", max_image_bytes) if m.parts else m.content
    out: dict[str, Any] = {"role": ROLE_NAMES[m.role], "content": content}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


def chat_body(req: pb.ChatRequest, model: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    if not req.messages:
        raise InvalidArgument.for_field("messages", "at least one message is required")
    body: dict[str, Any] = {"model": model, "messages": [_message(m, i, max_image_bytes=max_image_bytes)
                                                         for i, m in enumerate(req.messages)]}
    _sampling(req.sampling, body, chat=True)
    _response_format(req.response_format, body)
    if req.tools_json:
        body["tools"] = _json_field(req.tools_json, "tools_json")
    if req.tool_choice_json:
        body["tool_choice"] = _json_field(req.tool_choice_json, "tool_choice_json")
    if req.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = req.parallel_tool_calls
    return body


def complete_body(req: pb.CompleteRequest, model: str) -> dict[str, Any]:
    if req.prompt and req.prompt_token_ids:
        raise InvalidArgument.for_field("prompt_token_ids", "set either prompt or prompt_token_ids, not both")
    if not req.prompt and not req.prompt_token_ids:
        raise InvalidArgument.for_field("prompt", "must not be empty")
    if any(t < 0 for t in req.prompt_token_ids):
        raise InvalidArgument.for_field("prompt_token_ids", "token ids must not be negative")
    body: dict[str, Any] = {"model": model, "prompt": req.prompt or list(req.prompt_token_ids)}
    if req.echo:
        body["echo"] = True
    _sampling(req.sampling, body, chat=False)
    _response_format(req.response_format, body)
    return body


def tokenize_body(req: pb.TokenizeRequest, model: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    if bool(req.prompt) == bool(req.messages):
        raise InvalidArgument.for_field("prompt", "exactly one of prompt and messages is required")
    if req.messages:
        return {"model": model, "messages": [_message(m, i, max_image_bytes=max_image_bytes)
                                             for i, m in enumerate(req.messages)],
                "add_generation_prompt": req.add_generation_prompt, "add_special_tokens": req.add_special_tokens}
    return {"model": model, "prompt": req.prompt, "add_special_tokens": req.add_special_tokens}


def embed_body(req: pb.EmbedRequest, model: str) -> dict[str, Any]:
    if not req.inputs:
        raise InvalidArgument.for_field("inputs", "at least one input is required")
    for i, text in enumerate(req.inputs):
        if not text:
            raise InvalidArgument.for_field(f"inputs[{i}]", "must not be empty")
    body: dict[str, Any] = {"model": model, "input": list(req.inputs)}
    if req.HasField("dimensions"):
        if req.dimensions < 1:
            raise InvalidArgument.for_field("dimensions", "must be at least 1")
        body["dimensions"] = req.dimensions
    return body


def score_body(req: pb.ScoreRequest, model: str) -> dict[str, Any]:
    """The engine's ``/v1/score`` body (see ``engines/score_encoding.py``); the checks that need no
    tokenizer are made here, the context length is checked by the engine."""
    given = [name for name in ("context", "context_token_ids", "context_messages") if getattr(req, name)]
    if len(given) > 1:
        raise InvalidArgument.for_field(given[1], "set at most one of context, context_token_ids and "
                                                  f"context_messages (got {', '.join(given)})")
    if any(t < 0 for t in req.context_token_ids):
        raise InvalidArgument.for_field("context_token_ids", "token ids must not be negative")
    if not req.continuations:
        raise InvalidArgument.for_field("continuations", "at least one continuation is required")
    body: dict[str, Any] = {"model": model}
    if req.context:
        body["context"] = req.context
    elif req.context_token_ids:
        body["context_token_ids"] = list(req.context_token_ids)
    elif req.context_messages:
        body["context_messages"] = [_message(m, i, "context_messages") for i, m in enumerate(req.context_messages)]
    continuations: list[dict[str, Any]] = []
    for i, c in enumerate(req.continuations):
        if bool(c.text) == bool(c.token_ids):
            raise InvalidArgument.for_field(f"continuations[{i}]", "set exactly one of text and token_ids")
        if any(t < 0 for t in c.token_ids):
            raise InvalidArgument.for_field(f"continuations[{i}].token_ids", "token ids must not be negative")
        continuations.append({"text": c.text} if c.text else {"token_ids": list(c.token_ids)})
    body["continuations"] = continuations
    return body


def score_response(body: dict[str, Any]) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        scores=[pb.ContinuationScore(logprob=s["logprob"], is_greedy=bool(s["is_greedy"]), token_ids=s["token_ids"],
                                     token_logprobs=s["token_logprobs"]) for s in body.get("scores") or []],
        context_tokens=body.get("context_tokens") or 0, usage=_usage(body))


# ---------------------------------------------------------------------- responses


def _bytes(entry: dict[str, Any], token: str) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw else token.encode()


def _chat_logprobs(logprobs: dict[str, Any] | None) -> list[pb.TokenLogprob]:
    out = []
    for e in (logprobs or {}).get("content") or []:
        tops = [pb.TopLogprob(token=t["token"], logprob=t["logprob"], bytes=_bytes(t, t["token"]))
                for t in e.get("top_logprobs") or []]
        entry = pb.TokenLogprob(token=e["token"], bytes=_bytes(e, e["token"]), top_logprobs=tops)
        if e.get("logprob") is not None:
            entry.logprob = e["logprob"]
        out.append(entry)
    return out


def _completion_logprobs(logprobs: dict[str, Any] | None) -> list[pb.TokenLogprob]:
    if not logprobs:
        return []
    out = []
    tops = logprobs.get("top_logprobs") or []
    for i, (token, lp) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [],
                                              strict=False)):
        alternatives = tops[i] if i < len(tops) and tops[i] else {}
        entry = pb.TokenLogprob(token=token, bytes=token.encode(), top_logprobs=[
            pb.TopLogprob(token=t, logprob=v, bytes=t.encode())
            for t, v in sorted(alternatives.items(), key=lambda kv: -kv[1])])
        if lp is not None:
            entry.logprob = lp
        out.append(entry)
    return out


def _usage(chunk: dict[str, Any]) -> pb.Usage | None:
    u = chunk.get("usage")
    if not u:
        return None
    return pb.Usage(prompt_tokens=u.get("prompt_tokens") or 0, completion_tokens=u.get("completion_tokens") or 0)


def chat_chunk(chunk: dict[str, Any]) -> pb.ChatChunk:
    msg = pb.ChatChunk(id=chunk.get("id", ""), usage=_usage(chunk))
    for c in chunk.get("choices") or []:
        delta = c.get("delta") or {}
        msg.choices.append(pb.ChatChoiceDelta(
            index=c.get("index", 0), role=ROLES.get(delta.get("role") or "", pb.CHAT_ROLE_UNSPECIFIED),
            content=delta.get("content") or "",
            tool_calls=[pb.ToolCallDelta(index=t.get("index", 0), id=t.get("id") or "",
                                         name=(t.get("function") or {}).get("name") or "",
                                         arguments=(t.get("function") or {}).get("arguments") or "")
                        for t in delta.get("tool_calls") or []],
            finish_reason=FINISH.get(c.get("finish_reason") or "", pb.FINISH_REASON_UNSPECIFIED),
            logprobs=_chat_logprobs(c.get("logprobs")),
        ))
    return msg


def complete_chunk(chunk: dict[str, Any]) -> pb.CompleteChunk:
    msg = pb.CompleteChunk(id=chunk.get("id", ""), usage=_usage(chunk))
    for c in chunk.get("choices") or []:
        msg.choices.append(pb.CompleteChoiceDelta(
            index=c.get("index", 0), text=c.get("text") or "",
            finish_reason=FINISH.get(c.get("finish_reason") or "", pb.FINISH_REASON_UNSPECIFIED),
            logprobs=_completion_logprobs(c.get("logprobs")),
        ))
    return msg


def _runs(chunks: list[dict[str, Any]], can_extend: Callable[[list[dict[str, Any]]], bool],
          can_continue: Callable[[dict[str, Any]], bool]) -> list[list[dict[str, Any]]]:
    """Engine chunks (one choice each) grouped into runs that become one message each: a chunk joins
    the open run of its choice while ``can_extend(run)`` and ``can_continue(its choice)``. Choices
    keep their own order; a chunk with several choices or with usage is a run of its own, and
    nothing after it joins a run from before it. Grouping the raw chunks first builds one proto per
    message instead of one per token."""
    out: list[list[dict[str, Any]]] = []
    open_by_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        choices = chunk.get("choices") or []
        if chunk.get("usage") or len(choices) != 1:
            out.append([chunk])
            open_by_index.clear()
            continue
        c = choices[0]
        index = c.get("index", 0)
        run = open_by_index.get(index)
        if run is not None and can_extend(run) and can_continue(c):
            run.append(chunk)
            continue
        run = [chunk]
        out.append(run)
        open_by_index[index] = run
    return out


def _choice(chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk["choices"][0]


def _finished(run: list[dict[str, Any]]) -> bool:
    return FINISH.get(_choice(run[-1]).get("finish_reason") or "", pb.FINISH_REASON_UNSPECIFIED) != 0


def _chat_run(run: list[dict[str, Any]]) -> pb.ChatChunk:
    """One message for a run: the first chunk's role and tool calls, every chunk's content and
    logprobs in order, the last chunk's finish reason."""
    if len(run) == 1:
        return chat_chunk(run[0])
    first = _choice(run[0])
    delta = {**(first.get("delta") or {}),
             "content": "".join((_choice(c).get("delta") or {}).get("content") or "" for c in run)}
    msg = chat_chunk({**run[0], "choices": [{**first, "delta": delta, "logprobs": None,
                                             "finish_reason": _choice(run[-1]).get("finish_reason")}]})
    return _with_logprobs(msg, run, _chat_logprobs)


def _with_logprobs(msg: Any, run: list[dict[str, Any]], convert: Callable[[Any], list[pb.TokenLogprob]]) -> Any:
    """``msg`` (one choice) with the logprobs of every chunk of ``run`` in order."""
    merged = msg.choices[0]
    for c in run:
        if _choice(c).get("logprobs"):
            merged.logprobs.extend(convert(_choice(c)["logprobs"]))
    return msg


def _complete_run(run: list[dict[str, Any]]) -> pb.CompleteChunk:
    if len(run) == 1:
        return complete_chunk(run[0])
    first = _choice(run[0])
    msg = complete_chunk({**run[0], "choices": [{
        **first, "text": "".join(_choice(c).get("text") or "" for c in run), "logprobs": None,
        "finish_reason": _choice(run[-1]).get("finish_reason")}]})
    return _with_logprobs(msg, run, _completion_logprobs)


def _chat_can_extend(run: list[dict[str, Any]]) -> bool:
    return not (_choice(run[0]).get("delta") or {}).get("tool_calls") and not _finished(run)


def _chat_can_continue(c: dict[str, Any]) -> bool:
    delta = c.get("delta") or {}
    return not delta.get("tool_calls") and ROLES.get(delta.get("role") or "", pb.CHAT_ROLE_UNSPECIFIED) == 0


def chat_chunks(chunks: list[dict[str, Any]]) -> list[pb.ChatChunk]:
    """Messages for a run of engine chunks (a reader that fell behind, or a paced stream, gets several
    at once): the deltas of each choice are merged (content and logprobs concatenated), so each gRPC
    message and each SSE event downstream carries every token of that choice that was ready. Every
    message still holds one choice, as OpenAI streams do; tool-call deltas and a finished choice end
    a run; no delta merges into or from a usage chunk, but a usage chunk that ends the batch is set on
    the message before it (``_usage_joins_last``)."""
    return _usage_joins_last([_chat_run(run) for run in _runs(chunks, _chat_can_extend, _chat_can_continue)])


def complete_chunks(chunks: list[dict[str, Any]]) -> list[pb.CompleteChunk]:
    """``chat_chunks`` for text completions (a finished choice and the usage chunk end a run)."""
    return _usage_joins_last([_complete_run(run) for run in _runs(chunks, lambda run: not _finished(run),
                                                                  lambda c: True)])


def _usage_joins_last(msgs: list[Any]) -> list[Any]:
    """The usage chunk that ends a batch (no choices) rides on the message before it when that one has
    no usage yet: the last tokens, finish reason and usage that came together go out as one message
    (each message costs a write and a read on every hop)."""
    if len(msgs) > 1 and not msgs[-1].choices and msgs[-1].HasField("usage") and not msgs[-2].HasField("usage"):
        msgs[-2].usage.CopyFrom(msgs.pop().usage)
    return msgs


def embed_response(body: dict[str, Any]) -> pb.EmbedResponse:
    data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
    usage = body.get("usage") or {}
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(index=d.get("index", i), values=d["embedding"]) for i, d in enumerate(data)],
        usage=pb.Usage(prompt_tokens=usage.get("prompt_tokens") or 0))
