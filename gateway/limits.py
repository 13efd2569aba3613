"""Bounds on one request: the body size (an ASGI middleware, 413) and ``max_tokens`` against the
deployment's context length (400 naming ``max_tokens``). The caps on ``n``, the prompt list and the
``model`` string are checks of the request models (``protocol``), settings in ``LimitSettings``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.errors import DomainError, InvalidArgument
from services.core.logging import get_logger

from .errors import raw_error

log = get_logger("modelyard.gateway.limits")


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passed the limit (the middleware answers 413)."""


class BodyLimitMiddleware:
    """Requests whose body is larger than ``max_bytes`` are answered 413 in the OpenAI error shape.

    A declared ``Content-Length`` above the limit is refused before a byte of the body is read. The
    bytes that arrive are counted as well (chunked bodies have no length; a declared length may lie):
    once past the limit, ``receive`` raises, whatever the app answers to that is dropped and the
    413 is sent instead (the connection is then closed by the server: the rest of the body is never read).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _response(self) -> JSONResponse:
        return raw_error(
            413,
            f"The request body is larger than {self.max_bytes} bytes (limits.max_body_bytes).",
            "invalid_request_error",
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            log.info("request_body_too_large", path=scope["path"], declared=int(declared), limit=self.max_bytes)
            await self._response()(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to the failed read: replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            log.info("request_body_too_large", path=scope["path"], received=received, limit=self.max_bytes)
            if not started:
                await self._response()(scope, receive, send)


# ---------------------------------------------------------------- max_tokens and the context length

CONTEXT_TTL_S = 300.0  # a deployment's context length is asked again after this (a redeploy may change it)
# A prompt has at most about one token per byte of its text (byte-level and byte-fallback tokenizers);
# a chat template adds its own tokens: this much room per message, and once per request.
TEMPLATE_TOKENS_PER_MESSAGE = 32
TEMPLATE_TOKENS = 1024


class ContextLengths:
    """The context length (``max_model_len``) of each model name, as the inference service's
    ``Tokenize`` reports it, remembered ``ttl_s``. Bounded: only names that resolved to a deployment
    are kept, and the oldest entries go first past ``max_entries``."""

    def __init__(self, ttl_s: float = CONTEXT_TTL_S, max_entries: int = 4096) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._known: dict[str, tuple[int, float]] = {}

    def get(self, model: str) -> int | None:
        hit = self._known.get(model)
        if hit is None or hit[1] <= time.monotonic():
            return None
        return hit[0]

    def put(self, model: str, max_model_len: int) -> None:
        if max_model_len <= 0:
            return
        self._known.pop(model, None)
        while len(self._known) >= self._max:
            self._known.pop(next(iter(self._known)))
        self._known[model] = (max_model_len, time.monotonic() + self._ttl)


CONTEXT_REASON = "CONTEXT_LENGTH_EXCEEDED"  # OpenAI's code: context_length_exceeded


def context_exceeded(param: str, max_model_len: int, prompt_tokens: int, max_tokens: int) -> InvalidArgument:
    return InvalidArgument.for_field(
        param,
        f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_tokens} tokens "
        f"and {param} asks for {max_tokens} more ({prompt_tokens + max_tokens} > {max_model_len}); lower {param} "
        "or the prompt",
        reason=CONTEXT_REASON,
    )


def engine_context_error(err: DomainError, param: str | None, prompt_param: str) -> DomainError:
    """The engine's own refusal of a request longer than the context (vLLM, the transformers engine:
    "... maximum context length ..." without a field): the same 400, naming ``param`` (the max
    tokens field, when the request set it) or else the prompt's field."""
    if isinstance(err, InvalidArgument) and not err.violations and "maximum context length" in err.message:
        return InvalidArgument.for_field(param or prompt_param, err.message, reason=CONTEXT_REASON)
    return err


async def prompt_fits(
    lengths: ContextLengths,
    model: str,
    max_tokens: int | None,
    param: str,
    bounds: list[int],
    tokenize: Callable[[int], Awaitable[tuple[int, int]]],
) -> None:
    """Raise a 400 naming ``param`` when a prompt's tokens + ``max_tokens`` pass the context length.

    ``bounds`` are upper bounds of each prompt's token count (bytes of its text, plus room for a chat
    template). The context length is learnt from the model's first checked request; after that a
    prompt whose bound fits is not tokenized. ``tokenize(i)`` -> (prompt i's exact tokens, the context
    length), through the inference service. A failing ``Tokenize`` skips the check: the engine still
    refuses (and ``engine_context_error`` names the field then)."""
    if max_tokens is None or not bounds:
        return  # no max_tokens: the engine fills what room is left

    async def counted(indexes: list[int]) -> list[tuple[int, int]] | None:
        try:
            return list(await asyncio.gather(*(tokenize(i) for i in indexes)))
        except DomainError as err:
            log.info("context_check_skipped", model=model, error=err.message)
            return None

    checked: set[int] = set()
    known = lengths.get(model)
    if known is None:
        first = await counted([0])
        if first is None:
            return
        prompt_tokens, known = first[0]
        lengths.put(model, known)
        if known <= 0:
            return
        if prompt_tokens + max_tokens > known:
            raise context_exceeded(param, known, prompt_tokens, max_tokens)
        checked.add(0)
    if max_tokens >= known:
        raise InvalidArgument.for_field(
            param,
            f"this model's maximum context length is {known} tokens and {param} asks for {max_tokens}, which leaves "
            f"no room for the prompt; lower {param}",
            reason=CONTEXT_REASON,
        )
    near = [i for i, bound in enumerate(bounds) if i not in checked and bound + max_tokens > known]
    for prompt_tokens, max_model_len in (await counted(near) if near else None) or []:
        if max_model_len > 0 and prompt_tokens + max_tokens > max_model_len:
            raise context_exceeded(param, max_model_len, prompt_tokens, max_tokens)
