"""The ``/v1/score`` request of both engine servers: validation and token encoding, in plain Python.

Imported by the transformers server and by the vLLM server (which runs in ``.venv-vllm``, so this
module uses the standard library only). A score request (JSON)::

    {"model": str, "context": str | None, "context_token_ids": [int] | None,
     "context_messages": [{role, content, ...}] | None,
     "continuations": [{"text": str} | {"token_ids": [int]}, ...]}

Text is encoded with lm-evaluation-harness's rule for causal API models (``TemplateLM._encode_pair``
with ``add_special_tokens=False``): the context's trailing whitespace moves to the front of the
continuation, ``whole = tok(context + continuation)``, ``ctx = tok(context)``, and the continuation
is ``whole[len(ctx):]``; the scored sequence is ``ctx + continuation``. An empty context is scored
from ``prefix_token_id`` (BOS, else EOS), unless the continuation already starts with it, in
which case its first token becomes the context (lm-eval's ``loglikelihood``). A context given as
token ids keeps them; text continuations are then tokenized on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ScoreRequestError(ValueError):
    """A score request the engine refuses (HTTP 400); ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass
class EncodedScore:
    """One score request as token ids: a context per continuation (the same list unless the
    context is empty and lm-eval's prefix rule moved a token) and the continuations."""

    contexts: list[list[int]]
    continuations: list[list[int]]

    @property
    def context_tokens(self) -> int:
        return len(self.contexts[0]) if self.contexts else 0

    def shared_context(self) -> list[int] | None:
        """The context when every continuation has the same one, else None."""
        first = self.contexts[0]
        return first if all(c == first for c in self.contexts) else None


def _ids(value: Any, param: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ScoreRequestError(param, "must be a list of token ids")
    for t in value:
        if t < 0 or (vocab_size and t >= vocab_size):
            raise ScoreRequestError(param, f"token id {t} is outside the vocabulary (0..{vocab_size - 1})")
    return value


def encode_score(
    body: dict[str, Any],
    *,
    encode: Callable[[str], list[int]],
    render_chat: Callable[[list[dict[str, Any]]], str],
    prefix_token_id: int | None,
    max_model_len: int,
    vocab_size: int = 0,
) -> EncodedScore:
    """Validate ``body`` and turn it into token ids. ``encode`` tokenizes without special tokens;
    ``render_chat`` renders messages with the chat template and the generation prompt.
    Raises ``ScoreRequestError`` naming the field."""
    context_text = body.get("context")
    context_ids = body.get("context_token_ids")
    messages = body.get("context_messages")
    given = [
        name
        for name, v in (("context", context_text), ("context_token_ids", context_ids), ("context_messages", messages))
        if v
    ]
    if len(given) > 1:
        raise ScoreRequestError(
            given[1], f"set at most one of context, context_token_ids and context_messages (got {', '.join(given)})"
        )
    conts = body.get("continuations")
    if not isinstance(conts, list) or not conts:
        raise ScoreRequestError("continuations", "at least one continuation is required")
    if messages:
        if not isinstance(messages, list):
            raise ScoreRequestError("context_messages", "must be a list of messages")
        context_text = render_chat(messages)
    fixed_context = _ids(context_ids, "context_token_ids", vocab_size) if context_ids else None
    if context_text is not None and not isinstance(context_text, str):
        raise ScoreRequestError("context", "must be a string")

    contexts: list[list[int]] = []
    continuations: list[list[int]] = []
    ctx_cache: dict[str, list[int]] = {}
    for i, c in enumerate(conts):
        param = f"continuations[{i}]"
        if not isinstance(c, dict):
            raise ScoreRequestError(param, "must be an object with text or token_ids")
        text, ids = c.get("text"), c.get("token_ids")
        if bool(text) == bool(ids):
            raise ScoreRequestError(param, "set exactly one of text and token_ids")
        if ids:
            cont = list(_ids(ids, f"{param}.token_ids", vocab_size))
            if fixed_context is not None:
                ctx = fixed_context
            elif context_text:
                ctx = ctx_cache.get(context_text) or ctx_cache.setdefault(context_text, encode(context_text))
            else:
                ctx, cont = _empty_context(cont, prefix_token_id, param)
        elif fixed_context is not None:
            ctx, cont = fixed_context, encode(text)
        elif context_text:
            ctx, cont = _encode_pair(context_text, text, encode, ctx_cache)
        else:
            ctx, cont = _empty_context(encode(text), prefix_token_id, param)
        if not cont:
            raise ScoreRequestError(param, "encodes to no token after the context")
        if not ctx:
            raise ScoreRequestError("context", "encodes to no token")
        if len(ctx) + len(cont) > max_model_len:
            raise ScoreRequestError(
                param,
                f"context ({len(ctx)} tokens) plus continuation ({len(cont)} tokens) "
                f"exceed the deployment's context length of {max_model_len} tokens",
            )
        contexts.append(ctx)
        continuations.append(cont)
    return EncodedScore(contexts, continuations)


def _encode_pair(
    context: str, continuation: str, encode: Callable[[str], list[int]], ctx_cache: dict[str, list[int]]
) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = ctx_cache.get(context)
    if ctx is None:
        ctx = ctx_cache[context] = encode(context)
    return ctx, whole[len(ctx) :]


def _empty_context(cont: list[int], prefix_token_id: int | None, param: str) -> tuple[list[int], list[int]]:
    if prefix_token_id is None:
        raise ScoreRequestError("context", "an empty context needs a BOS or EOS token, and the tokenizer has none")
    if not cont:
        raise ScoreRequestError(param, "encodes to no token")
    if cont[0] != prefix_token_id:
        return [prefix_token_id], cont
    return cont[:1], cont[1:]


def score_result(encoded: EncodedScore, token_logprobs: list[list[float]], greedy: list[bool]) -> dict[str, Any]:
    """The ``/v1/score`` answer."""
    scores = [
        {"logprob": float(sum(lps)), "is_greedy": bool(g), "token_ids": cont, "token_logprobs": lps}
        for cont, lps, g in zip(encoded.continuations, token_logprobs, greedy, strict=True)
    ]
    scored = encoded.context_tokens + sum(len(c) for c in encoded.continuations)
    return {
        "object": "score",
        "scores": scores,
        "context_tokens": encoded.context_tokens,
        "usage": {"prompt_tokens": scored, "completion_tokens": 0, "total_tokens": scored},
    }
