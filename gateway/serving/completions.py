"""POST /v1/completions: OpenAI completion requests (one or more prompts) -> one inference ``Complete``
stream per prompt -> chunks or one ``text_completion`` (choice index = prompt index * n + choice)."""

from __future__ import annotations

import asyncio
import functools
import operator
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import DomainError, InvalidArgument

from .. import protocol as p
from ..errors import finite, token_logprob
from ..routing import Target
from .base import CallContext, OpenAIServing, Render, Upstream, sampling_params

_LOGPROB_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
_text = operator.attrgetter("text")


@dataclass
class _TextLogprobs:
    """Completion logprobs of one choice, with running text offsets."""

    offset: int = 0
    out: p.CompletionLogprobs = field(default_factory=p.CompletionLogprobs)

    def add(self, items: Any) -> p.CompletionLogprobs:
        part = p.CompletionLogprobs()
        for lp in items:
            part.tokens.append(lp.token)
            part.token_logprobs.append(token_logprob(lp))
            top = {t.token: finite(t.logprob) for t in lp.top_logprobs}
            part.top_logprobs.append({k: v for k, v in top.items() if v is not None} or None)
            part.text_offset.append(self.offset)
            self.offset += len(lp.token)
        for name in _LOGPROB_FIELDS:
            getattr(self.out, name).extend(getattr(part, name))
        return part


def complete_request(req: p.CompletionRequest, prompt: str | list[int], target: Target) -> pb.CompleteRequest:
    out = pb.CompleteRequest(
        deployment=target.deployment,
        adapter=target.adapter,
        echo=req.echo,
        sampling=sampling_params(req, logprobs=req.logprobs is not None, top_logprobs=req.logprobs),
    )
    if isinstance(prompt, str):
        out.prompt = prompt
    else:
        out.prompt_token_ids.extend(prompt)
    return out


def tokenize_request(prompt: str | list[int], target: Target) -> pb.TokenizeRequest:
    """Tokenize a text prompt; a token-id prompt's count is known, the call only learns the context length."""
    text = prompt if isinstance(prompt, str) else " "
    return pb.TokenizeRequest(deployment=target.deployment, prompt=text, add_special_tokens=True)


def prompt_bound(prompt: str | list[int]) -> int:
    """At least the prompt's tokens: one a byte of text (and a few special ones), or its token ids."""
    return len(prompt.encode()) + 8 if isinstance(prompt, str) else len(prompt)


def _renderer(prompt_index: int, n: int, logprobs: bool) -> Render:
    """The choice JSON of one prompt's deltas (its choices numbered after the earlier prompts')."""
    base = prompt_index * n
    offsets: dict[int, _TextLogprobs] = {}

    def render(d: pb.CompleteChoiceDelta, text: str, finish: p.FinishReason | None) -> bytes:
        if not logprobs:
            return p.completion_choice_json(base + d.index, text, finish)
        lp = offsets.setdefault(d.index, _TextLogprobs()).add(d.logprobs)
        return (
            p.CompletionChoice(index=base + d.index, text=text, logprobs=lp, finish_reason=finish)
            .model_dump_json()
            .encode()
        )

    return render


class ServingCompletion(OpenAIServing):
    async def start(self, ctx: CallContext, req: p.CompletionRequest) -> list[Upstream]:
        """Validated, admitted, and one stream per prompt opened (each one's first chunk read)."""
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidArgument.for_field("best_of", "only best_of == n is supported")
        if req.suffix:
            raise InvalidArgument.for_field("suffix", "is not supported")
        prompts = req.prompts()
        self.filter.check_prompt((x for x in prompts if isinstance(x, str)), "prompt")
        chars = sum(len(x) if isinstance(x, str) else 4 * len(x) for x in prompts)  # ~4 characters a token
        await self.admit(ctx, chars, req.max_tokens, req.n * len(prompts))
        upstreams: list[Upstream] = []
        try:
            await self.check_context(
                ctx,
                req.max_tokens,
                "max_tokens",
                [prompt_bound(x) for x in prompts],
                lambda i, t: tokenize_request(prompts[i], t),
                lambda i: None if isinstance(prompts[i], str) else len(prompts[i]),
            )
            opened = [
                asyncio.ensure_future(self.open_stream(ctx, "Complete", functools.partial(complete_request, req, x)))
                for x in prompts
            ]
            try:
                await asyncio.gather(*opened)
            finally:
                for task in opened:
                    if task.done() and not task.cancelled() and task.exception() is None:
                        upstreams.append(task.result())
                    else:
                        task.cancel()
            return upstreams
        except DomainError as err:
            self.close(ctx, upstreams)
            mapped = self.context_error(err, "max_tokens" if req.max_tokens is not None else None, "prompt")
            if mapped is err:
                raise
            raise mapped from None
        except BaseException:
            self.close(ctx, upstreams)
            raise

    async def stream(self, ctx: CallContext, req: p.CompletionRequest) -> AsyncGenerator[bytes, None]:
        """The SSE events of a ``stream: true`` request, once every prompt's first chunk is in."""
        upstreams = await self.start(ctx, req)
        return self.sse(ctx, self.completion_events(ctx, req, upstreams), upstreams)

    async def create(self, ctx: CallContext, req: p.CompletionRequest) -> p.Completion:
        """The ``text_completion`` of a ``stream: false`` request."""
        upstreams = await self.start(ctx, req)
        return await self.completion_collect(ctx, req, upstreams)

    def completion_events(
        self, ctx: CallContext, req: p.CompletionRequest, upstreams: list[Upstream]
    ) -> AsyncGenerator[bytes, None]:
        """Chunks of every prompt in turn."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        envelope = p.ChunkEnvelope(
            p.Completion(id=cid, created=created, model=ctx.model, choices=[]), None if req.include_usage else {"usage"}
        )
        logprobs = req.logprobs is not None
        streams: Iterator[tuple[Upstream, Render]] = (
            (upstream, _renderer(i, req.n, logprobs)) for i, upstream in enumerate(upstreams)
        )

        def usage_chunk() -> p.Completion:
            return p.Completion(
                id=cid,
                created=created,
                model=ctx.model,
                choices=[],
                usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens),
            )

        return self.choice_events(ctx, streams, req.n, envelope, _text, usage_chunk if req.include_usage else None)

    async def completion_collect(
        self, ctx: CallContext, req: p.CompletionRequest, upstreams: list[Upstream]
    ) -> p.Completion:
        events: AsyncIterator[bytes] = self.completion_events(ctx, req.model_copy(update={"stream": False}), upstreams)
        chunks = await self.collect(ctx, events, upstreams, p.Completion)
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, p.CompletionLogprobs] = {}
        finish: dict[int, p.FinishReason | None] = {}
        for chunk in chunks:
            for c in chunk.choices:
                texts.setdefault(c.index, []).append(c.text)
                if c.logprobs is not None:
                    acc = logprobs.setdefault(c.index, p.CompletionLogprobs())
                    for name in _LOGPROB_FIELDS:
                        getattr(acc, name).extend(getattr(c.logprobs, name))
                finish[c.index] = c.finish_reason or finish.get(c.index)
        choices = [
            p.CompletionChoice(
                index=i,
                text="".join(texts.get(i, [])),
                logprobs=logprobs.get(i, p.CompletionLogprobs()) if req.logprobs is not None else None,
                finish_reason=finish.get(i),
            )
            for i in range(len(upstreams) * req.n)
        ]
        return p.Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            model=ctx.model,
            choices=choices,
            usage=p.Usage.of(ctx.prompt_tokens, ctx.completion_tokens),
        )
