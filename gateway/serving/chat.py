"""POST /v1/chat/completions: OpenAI chat requests -> the inference ``Chat`` stream -> chunks or one
``chat.completion``."""

from __future__ import annotations

import json
import operator
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import DomainError, InvalidArgument

from .. import protocol as p
from ..errors import finite, token_logprob
from ..images import Image, load_image
from ..limits import TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE
from ..routing import Target
from .base import CallContext, OpenAIServing, Upstream, sampling_params

ROLES = {
    "system": pb.CHAT_ROLE_SYSTEM,
    "user": pb.CHAT_ROLE_USER,
    "assistant": pb.CHAT_ROLE_ASSISTANT,
    "tool": pb.CHAT_ROLE_TOOL,
    "developer": pb.CHAT_ROLE_DEVELOPER,
}
FORMATS = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_content = operator.attrgetter("content")
# A prompt with images has no token bound the gateway can compute (the model's processor decides how many
# tokens an image takes): its context check always asks the engine (Tokenize).
IMAGE_PROMPT_BOUND = 2**62

# (message index, part index) -> the image of that part
Images = dict[tuple[int, int], Image]
# A field of the inference service's ChatMessage.parts, which are the request's content parts one for one.
_PART_FIELD = re.compile(r"(messages\[\d+\])\.parts(\[\d+\])")


def request_field(err: DomainError) -> DomainError:
    """``err`` naming the request's field (``messages[0].content[1]``) where the inference service named its
    own (``messages[0].parts[1].image``)."""
    if not isinstance(err, InvalidArgument) or not err.violations:
        return err
    violation = err.violations[0]
    found = _PART_FIELD.match(violation.field)
    if found is None:
        return err
    return InvalidArgument.for_field(f"{found[1]}.content{found[2]}", violation.description, reason=err.reason)


def response_format(fmt: p.ResponseFormatIn | None) -> pb.ResponseFormat | None:
    if fmt is None:
        return None
    out = pb.ResponseFormat(type=FORMATS[fmt.type])
    if fmt.type == "json_schema":
        schema = fmt.json_schema or {}
        if "schema" not in schema:
            raise InvalidArgument.for_field("response_format.json_schema.schema", "is required for json_schema")
        out.json_schema_name = str(schema.get("name", ""))
        out.json_schema = json.dumps(schema["schema"])
        out.strict = bool(schema.get("strict", False))
    return out


def chat_logprobs(items: Any) -> p.ChatLogprobs:
    return p.ChatLogprobs(
        content=[
            p.TokenLogprobOut(
                token=lp.token,
                logprob=token_logprob(lp),
                bytes=list(lp.bytes) if lp.bytes else None,
                top_logprobs=[
                    p.TopLogprobOut(token=t.token, logprob=finite(t.logprob), bytes=list(t.bytes) if t.bytes else None)
                    for t in lp.top_logprobs
                ],
            )
            for lp in items
        ]
    )


def _parts(m: p.ChatMessageIn, i: int, images: Images) -> list[pb.ContentPart]:
    out = []
    for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
        if isinstance(part, p.TextPart):
            out.append(pb.ContentPart(text=part.text))
        else:
            image = images[(i, j)]
            out.append(
                pb.ContentPart(
                    image=pb.ImageInput(data=image.data, mime_type=image.mime_type, detail=part.image_url.detail or "")
                )
            )
    return out


def chat_messages(req: p.ChatCompletionRequest, images: Images | None = None) -> list[pb.ChatMessage]:
    """The messages as protos; a message with images (``images``, from ``ServingChat.images``) as ordered
    ``parts``, every other one as plain ``content`` (text parts joined), as before images existed."""
    return [
        pb.ChatMessage(
            role=ROLES[m.role],
            content="" if images and m.has_images() else m.text(),
            parts=_parts(m, i, images) if images and m.has_images() else None,
            name=m.name or "",
            tool_call_id=m.tool_call_id or "",
            tool_calls=[
                pb.ToolCall(id=t.id, name=t.function.name, arguments=t.function.arguments) for t in m.tool_calls or ()
            ],
        )
        for i, m in enumerate(req.messages)
    ]


def prompt_bound(req: p.ChatCompletionRequest, images: Images | None = None) -> int:
    """At least the prompt tokens of the chat (one a byte of text, room for the template around it); with
    images, ``IMAGE_PROMPT_BOUND`` (only the engine can count them)."""
    if images:
        return IMAGE_PROMPT_BOUND
    size = sum(
        len(m.text().encode())
        + len((m.name or "").encode())
        + sum(len(t.function.arguments) for t in m.tool_calls or ())
        for m in req.messages
    )
    tools = len(json.dumps(req.tools)) if req.tools else 0
    return size + tools + TEMPLATE_TOKENS_PER_MESSAGE * len(req.messages) + TEMPLATE_TOKENS


def tokenize_request(
    req: p.ChatCompletionRequest, target: Target, messages: list[pb.ChatMessage] | None = None
) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(
        deployment=target.deployment,
        messages=chat_messages(req) if messages is None else messages,
        add_generation_prompt=True,
    )


def chat_request(
    req: p.ChatCompletionRequest, target: Target, messages: list[pb.ChatMessage] | None = None
) -> pb.ChatRequest:
    out = pb.ChatRequest(
        deployment=target.deployment,
        adapter=target.adapter,
        messages=chat_messages(req) if messages is None else messages,
        sampling=sampling_params(req, logprobs=req.logprobs, top_logprobs=req.top_logprobs if req.logprobs else None),
        tools_json=json.dumps(req.tools) if req.tools else "",
        tool_choice_json=json.dumps(req.tool_choice) if req.tool_choice is not None else "",
        parallel_tool_calls=req.parallel_tool_calls,
    )
    fmt = response_format(req.response_format)
    if fmt is not None:
        out.response_format.CopyFrom(fmt)
    return out


def _full_choice(d: pb.ChatChoiceDelta, content: str | None, finish: p.FinishReason | None, logprobs: bool) -> bytes:
    """A choice with tool calls or logprobs, through its model (the plain ones are pre-serialized)."""
    tool_calls = [
        p.ToolCallDeltaOut(
            index=t.index,
            id=t.id or None,
            type="function" if t.id else None,
            function=p.FunctionDelta(name=t.name or None, arguments=t.arguments),
        )
        for t in d.tool_calls
    ] or None
    delta = p.ChatDelta(role="assistant" if d.role else None, content=content, tool_calls=tool_calls)
    return (
        p.ChatChunkChoice(
            index=d.index, delta=delta, finish_reason=finish, logprobs=chat_logprobs(d.logprobs) if logprobs else None
        )
        .model_dump_json()
        .encode()
    )


class ServingChat(OpenAIServing):
    def validate(self, req: p.ChatCompletionRequest) -> None:
        if req.top_logprobs and not req.logprobs:
            raise InvalidArgument.for_field("top_logprobs", "requires logprobs=true")
        self.filter.check_prompt((m.text() for m in req.messages), "messages")

    async def images(self, req: p.ChatCompletionRequest) -> Images:
        """The images of the request's image parts, read (``gateway/images.py``) and checked against
        ``images.max_images``; each refusal a 400 naming its field."""
        settings = self.settings.images
        found: Images = {}
        client = None
        try:
            for i, m in enumerate(req.messages):
                if not m.has_images():
                    continue
                for j, part in enumerate(m.content or ()):
                    if not isinstance(part, p.ImagePart):
                        continue
                    where = f"messages[{i}].content[{j}]"
                    if m.role != "user":
                        raise InvalidArgument.for_field(
                            where, f"images are accepted in user messages only, not {m.role}"
                        )
                    if len(found) >= settings.max_images:
                        raise InvalidArgument.for_field(
                            where, f"at most {settings.max_images} images in one request (images.max_images)"
                        )
                    url = part.image_url.url
                    if client is None and settings.allow_remote_urls and not url[:5].lower().startswith("data:"):
                        client = httpx.AsyncClient(follow_redirects=True, max_redirects=3)
                    found[(i, j)] = await load_image(url, f"{where}.image_url.url", settings, client)
        finally:
            if client is not None:
                await client.aclose()
        return found

    async def start(self, ctx: CallContext, req: p.ChatCompletionRequest) -> Upstream:
        """Validated, admitted, and its stream opened on a replica (its first chunk read)."""
        self.validate(req)
        images = await self.images(req) if any(m.has_images() for m in req.messages) else None
        messages = chat_messages(req, images)
        await self.admit(ctx, sum(len(m.text()) for m in req.messages), req.max_new_tokens, req.n)
        max_param = req.max_tokens_param if req.max_new_tokens is not None else None
        try:
            await self.check_context(
                ctx,
                req.max_new_tokens,
                req.max_tokens_param,
                [prompt_bound(req, images)],
                lambda i, t: tokenize_request(req, t, messages),
            )
            return await self.open_stream(ctx, "Chat", lambda t: chat_request(req, t, messages))
        except DomainError as err:
            self.settle(ctx)
            mapped = self.context_error(request_field(err), max_param, "messages")
            if mapped is err:
                raise
            raise mapped from None
        except BaseException:
            self.settle(ctx)
            raise

    async def stream(self, ctx: CallContext, req: p.ChatCompletionRequest) -> AsyncGenerator[bytes, None]:
        """The SSE events of a ``stream: true`` request, once its first chunk is in."""
        upstream = await self.start(ctx, req)
        return self.sse(ctx, self.chat_events(ctx, req, upstream), [upstream])

    async def create(self, ctx: CallContext, req: p.ChatCompletionRequest) -> p.ChatCompletion:
        """The ``chat.completion`` of a ``stream: false`` request."""
        upstream = await self.start(ctx, req)
        return await self.chat_collect(ctx, req, upstream)

    def chat_events(
        self, ctx: CallContext, req: p.ChatCompletionRequest, upstream: Upstream
    ) -> AsyncGenerator[bytes, None]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        envelope = p.ChunkEnvelope(
            p.ChatCompletionChunk(id=cid, created=created, model=ctx.model, choices=[]),
            None if req.include_usage else {"usage"},
        )
        logprobs = req.logprobs

        def render(d: pb.ChatChoiceDelta, text: str, finish: p.FinishReason | None) -> bytes:
            content = text if (text or d.role) else None
            if d.tool_calls or logprobs:
                return _full_choice(d, content, finish, logprobs)
            return p.chat_choice_json(d.index, bool(d.role), content, finish)

        def usage_chunk() -> p.ChatCompletionChunk:
            return p.ChatCompletionChunk(
                id=cid,
                created=created,
                model=ctx.model,
                choices=[],
                usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens),
            )

        return self.choice_events(
            ctx, [(upstream, render)], req.n, envelope, _content, usage_chunk if req.include_usage else None
        )

    async def chat_collect(
        self, ctx: CallContext, req: p.ChatCompletionRequest, upstream: Upstream
    ) -> p.ChatCompletion:
        events: AsyncIterator[bytes] = self.chat_events(ctx, req.model_copy(update={"stream": False}), upstream)
        chunks = await self.collect(ctx, events, [upstream], p.ChatCompletionChunk)
        texts: dict[int, list[str]] = {}
        tools: dict[int, dict[int, dict[str, str]]] = {}
        logprobs: dict[int, list[p.TokenLogprobOut]] = {}
        finish: dict[int, p.FinishReason | None] = {}
        for chunk in chunks:
            for c in chunk.choices:
                texts.setdefault(c.index, []).append(c.delta.content or "")
                for t in c.delta.tool_calls or ():
                    call = tools.setdefault(c.index, {}).setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] = t.id or call["id"]
                    call["name"] = t.function.name or call["name"]
                    call["arguments"] += t.function.arguments
                if c.logprobs is not None:
                    logprobs.setdefault(c.index, []).extend(c.logprobs.content or ())
                finish[c.index] = c.finish_reason or finish.get(c.index)
        choices = []
        for i in range(req.n):
            calls = [
                p.ToolCallOut(id=c["id"], function=p.FunctionOut(name=c["name"], arguments=c["arguments"]))
                for _, c in sorted(tools.get(i, {}).items())
            ] or None
            content = "".join(texts.get(i, []))
            choices.append(
                p.ChatChoice(
                    index=i,
                    message=p.ChatMessageOut(content=content if content or not calls else None, tool_calls=calls),
                    logprobs=p.ChatLogprobs(content=logprobs.get(i, [])) if req.logprobs else None,
                    finish_reason=finish.get(i),
                )
            )
        return p.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=ctx.model,
            choices=choices,
            usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens),
        )
