"""The transformers reference engine: an OpenAI-compatible HTTP server on a private loopback port.

Run by the inference service as a child process::

    python -m services.inference.engines.transformers_server --model DIR --port P \
        [--served-model-name NAME] [--lora ALIAS=DIR ...] [--dtype auto] [--max-model-len N] [--max-num-seqs N]

It speaks the subset of vLLM's server that the inference service uses, so one HTTP client serves
both engines: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``/v1/completions`` (SSE streaming or not, ``stream_options.include_usage``, logprobs, echo with
prompt logprobs), ``POST /v1/score`` (our extension: log-likelihoods of continuations of one
context, the context computed once; see ``score_encoding``), ``POST /tokenize``, ``POST /v1/embeddings`` (mean-pooled last hidden states),
``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. Generation goes through the
continuous-batching ``Scheduler``; a client that disconnects aborts its request.

A vision-language model (a config with ``vision_config``: ``services.core.vision``) is loaded with
``AutoModelForImageTextToText`` and its processor: chat messages may then hold OpenAI ``image_url`` parts
whose URL is a base64 data URL (the inference service sends nothing else; this server fetches nothing). The
chat is rendered with the processor's chat template (each image part as ``{"type": "image"}``), the images
go through the processor, and the request's image inputs ride with its prompt into the scheduler; its
prompt tokens (usage, ``/tokenize``) count the image tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from services.core.logging import configure_logging, get_logger
from services.core.runtime import freeze_startup_heap

from ..streaming import Pacing
from . import tool_calls
from .constrained import ConstraintError, Constraints, Grammar
from .scheduler import BASE_ADAPTER, Event, GenRequest, RequestError, Sampling, Scheduler, TokenInfo
from .score_encoding import EncodedScore, ScoreRequestError, encode_score, score_result

log = get_logger(__name__)

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----------------------------------------------------------------------------- request models


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past an end-of-sequence token


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True


class CompletionBody(_Body):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str | list[str]
    dimensions: int | None = None


class LoadLoraBody(BaseModel):
    lora_name: str
    lora_path: str = ""


def request_error(param: str, message: str) -> RequestError:
    """A 400 naming ``param`` (its message starts with it, as the inference service reads it back)."""
    err = RequestError(f"{param}: {message}")
    err.param = param  # type: ignore[attr-defined]
    return err


def decode_image(url: str, param: str) -> Any:
    """The PIL image of a base64 ``data:`` URL (RGB)."""
    from PIL import Image, UnidentifiedImageError

    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or ";base64" not in header:
        raise request_error(param, "must be a base64 data URL (data:image/png;base64,...); this engine fetches "
                                   "no URLs")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise request_error(param, f"not a readable image: {exc}") from None
    return image.convert("RGB")


class ModelNotFound(Exception):
    """The request names neither the served model nor a loaded adapter (HTTP 404)."""


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


# ----------------------------------------------------------------------------- engine


class TransformersEngineServer:
    """The model, its tokenizer and scheduler, and the request translation of the HTTP API."""

    def __init__(self, model_dir: Path, *, served_model_name: str, dtype: str, max_model_len: int,
                 max_num_seqs: int, loras: dict[str, str], pacing: Pacing | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from services.core.vision import load_processor, vision_info

        self.served_model_name = served_model_name
        self.pacer = (pacing or Pacing()).pacer()
        self.processor: Any = None  # a vision-language model's processor (None: a text model)
        if vision_info(model_dir) is not None:
            from transformers import AutoModelForImageTextToText

            self.processor = load_processor(model_dir)
            self.tokenizer = self.processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPES[dtype])
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        model.eval()
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])  # token ids a prompt may hold
        context = getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 2048
        self.max_model_len = min(max_model_len, context) if max_model_len else context
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(model, self.tokenizer, max_num_seqs=max_num_seqs, eos_ids=eos_ids)
        self._eos_ids = eos_ids
        self._constraints: Constraints | None = None  # built at the first constrained request
        for alias, path in loras.items():
            self._load_adapter(alias, path)
        self.created = int(time.time())

    # -- adapters (run in the scheduler thread)

    def _load_adapter(self, alias: str, path: str) -> None:
        from peft import PeftModel

        sched = self.scheduler
        if alias in sched.adapters or alias == self.served_model_name:
            raise RequestError(f"adapter {alias!r} is already loaded")
        if not (Path(path) / "adapter_config.json").is_file():
            raise RequestError(f"lora_path {path!r} has no adapter_config.json")
        if isinstance(sched.model, PeftModel):
            sched.model.load_adapter(path, adapter_name=alias)
        else:
            sched.model = PeftModel.from_pretrained(sched.model, path, adapter_name=alias)
        sched.model.eval()
        sched.adapters[alias] = path
        log.info("adapter_loaded", alias=alias, path=path)

    def _unload_adapter(self, alias: str) -> None:
        sched = self.scheduler
        if alias not in sched.adapters:
            raise RequestError(f"adapter {alias!r} is not loaded")
        if len(sched.adapters) == 1:
            sched.model = sched.model.unload()
        else:
            sched.model.delete_adapter(alias)
        del sched.adapters[alias]
        log.info("adapter_unloaded", alias=alias)

    async def load_adapter(self, alias: str, path: str) -> None:
        await self.scheduler.call(lambda: self._load_adapter(alias, path))

    async def unload_adapter(self, alias: str) -> None:
        await self.scheduler.call(lambda: self._unload_adapter(alias))

    # -- requests

    def resolve_adapter(self, model: str) -> str | None:
        if not model or model == self.served_model_name:
            return None
        if model in self.scheduler.adapters:
            return model
        raise ModelNotFound(f"The model `{model}` does not exist.")

    async def grammar(self, response_format: dict[str, Any] | None,
                      tools: tool_calls.ToolSpec | None = None) -> Grammar | None:
        """The grammar a request's output must follow (``constrained``): its tool choice (required or
        a named function) or its ``response_format``; None for free text. Compiled off the loop."""
        kind = (response_format or {}).get("type") or "text"
        constrains_tools = tools is not None and tools.constrains
        if kind not in ("text", "json_object", "json_schema"):
            raise ConstraintError("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
        if kind == "text" and not constrains_tools:
            return None
        if kind != "text" and constrains_tools:
            raise ConstraintError("response_format", f"cannot be combined with tool_choice {tools.choice!r}")
        if self._constraints is None:
            vocab = int(self.scheduler.model.get_output_embeddings().weight.shape[0])
            self._constraints = await asyncio.to_thread(Constraints, self.tokenizer, vocab_size=vocab,
                                                        stop_ids=self._eos_ids)
        constraints = self._constraints
        if constrains_tools:
            return await asyncio.to_thread(constraints.tool_calls, tools)
        if kind == "json_object":
            return await asyncio.to_thread(constraints.json_object)
        spec = (response_format or {}).get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError("response_format.json_schema.schema", "is required for json_schema")
        return await asyncio.to_thread(constraints.json_schema, spec["schema"])

    def chat_inputs(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> tuple[list[int], dict[str, Any] | None]:
        """The prompt's token ids and, when its messages hold images, the image inputs the model takes
        with them (None for a text prompt)."""
        images, rendered = [], []
        for i, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, list) or not any(
                    isinstance(p, dict) and p.get("type") == "image_url" for p in content):
                rendered.append(m)
                continue
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    param = f"messages[{i}].content[{j}].image_url.url"
                    if self.processor is None:
                        raise request_error(param, "this model takes no images (it is not a vision-language model)")
                    images.append(decode_image(str((part.get("image_url") or {}).get("url") or ""), param))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            rendered.append({**m, "content": parts})
        if not images:
            return self.chat_prompt(messages, add_generation_prompt=add_generation_prompt, tools=tools), None
        try:
            text = self.processor.apply_chat_template(tool_calls.template_messages(rendered), tools=tools or None,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise RequestError(f"messages: chat template failed: {exc}") from None
        try:
            out = self.processor(text=[text], images=images, return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - an image the processor refuses (size, mode) is the request's
            raise RequestError(f"messages: the images could not be processed: {exc}") from None
        ids = out["input_ids"][0].tolist()
        return ids, {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}

    def chat_prompt(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not messages:
            raise RequestError("messages: at least one message is required")
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(tool_calls.template_messages(messages), tools=tools or None,
                                                      tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise RequestError(f"messages: chat template failed: {exc}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sampling(self, body: _Body, prompt_len: int, *, logprobs: bool, top_logprobs: int,
                 allow_zero: bool = False) -> Sampling:
        if not 1 <= body.n <= self.scheduler.max_num_seqs:
            raise RequestError(f"n: must be between 1 and max_num_seqs ({self.scheduler.max_num_seqs})")
        if prompt_len >= self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens; "
                               f"the prompt has {prompt_len} tokens")
        room = self.max_model_len - prompt_len
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = room
        if max_tokens < (0 if allow_zero else 1):
            raise RequestError(f"max_tokens: must be at least {0 if allow_zero else 1}, got {max_tokens}")
        if max_tokens > room:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens; you requested "
                               f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                               f"for the completion)")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if temperature < 0:
            raise RequestError("temperature: must be >= 0")
        if not 0 < top_p <= 1:
            raise RequestError("top_p: must be in (0, 1]")
        if top_logprobs < 0 or top_logprobs > 20:
            raise RequestError("top_logprobs: must be in [0, 20]")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=-1 if body.top_k is None else body.top_k, seed=body.seed, stop=[s for s in stop if s],
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=body.ignore_eos,
        )

    async def generate(self, req: GenRequest) -> AsyncIterator[Event]:
        """Events of ``req`` until its ``done`` event; aborts it when the consumer goes away."""
        self.scheduler.submit(req)
        try:
            while True:
                event = await req.events.get()
                if event.kind == "error":
                    raise RuntimeError(event.message)
                yield event
                if event.kind == "done":
                    return
        finally:
            req.abort()

    async def stream_events(self, req: GenRequest) -> AsyncIterator[Event]:
        """``generate`` for a streamed answer: paced under load (``streaming.Pacer``), the deltas of
        each choice that came meanwhile merged into one event, so one SSE event carries them all."""
        if self.pacer.interval_s <= 0:
            async for event in self.generate(req):
                yield event
            return

        async def batches() -> AsyncIterator[list[Event]]:
            async for event in self.generate(req):
                yield [event]

        async with contextlib.aclosing(self.pacer.stream(batches())) as paced:
            async for batch in paced:
                for event in merge_deltas(batch):
                    yield event

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        def run() -> tuple[list[list[float]], int]:
            model = self.scheduler.model
            if self.scheduler.adapters:
                model = model.get_base_model()
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
            out = model(**enc, output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return pooled.tolist(), int(enc["attention_mask"].sum())

        return await self.scheduler.call(run)

    # -- scoring

    def encode_score(self, body: dict[str, Any]) -> EncodedScore:
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

        def render(messages: list[dict[str, Any]]) -> str:
            if not getattr(tok, "chat_template", None):
                raise ScoreRequestError("context_messages", "this model has no chat template")
            try:
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
                raise ScoreRequestError("context_messages", f"chat template failed: {exc}") from None

        return encode_score(body, encode=lambda text: tok.encode(text, add_special_tokens=False),
                            render_chat=render, prefix_token_id=prefix, max_model_len=self.max_model_len,
                            vocab_size=self.scheduler.model.get_output_embeddings().weight.shape[0])

    async def score(self, encoded: EncodedScore, adapter: str | None) -> tuple[list[list[float]], list[bool]]:
        """Log-probabilities of each continuation token and whether each continuation is greedy: per
        distinct context, one forward of the context (its KV cache kept), then the continuations in
        padded batches of at most ``max_num_seqs`` on top of a copy of that cache. Runs in the
        scheduler thread between two generation steps."""
        return await self.scheduler.call(lambda: self._score(encoded, adapter))

    def _score(self, encoded: EncodedScore, adapter: str | None) -> tuple[list[list[float]], list[bool]]:
        from transformers.cache_utils import DynamicCache

        sched = self.scheduler
        if adapter and adapter not in sched.adapters:
            raise RequestError(f"adapter {adapter!r} is not loaded")
        model = sched.model

        def adapter_kwargs(rows: int) -> dict[str, Any]:
            return {"adapter_names": [adapter or BASE_ADAPTER] * rows} if sched.adapters else {}

        lps: list[list[float]] = [[] for _ in encoded.continuations]
        greedy = [True] * len(encoded.continuations)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ctx in enumerate(encoded.contexts):
            groups.setdefault(tuple(ctx), []).append(i)
        with torch.no_grad():
            for ctx, members in groups.items():
                cache = DynamicCache(config=model.config)
                out = model(input_ids=torch.tensor([ctx]), past_key_values=cache, use_cache=True, logits_to_keep=1,
                            **adapter_kwargs(1))
                first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
                base = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                for i in members:  # the first token of every continuation comes from the context's last position
                    tok = encoded.continuations[i][0]
                    lps[i].append(float(first[tok]))
                    greedy[i] = int(first.argmax()) == tok
                longer = [i for i in members if len(encoded.continuations[i]) > 1]
                for start in range(0, len(longer), sched.max_num_seqs):
                    self._score_rest(model, base, len(ctx), longer[start:start + sched.max_num_seqs], encoded,
                                     lps, greedy, adapter_kwargs)
        return lps, greedy

    def _score_rest(self, model: Any, base: list[tuple[torch.Tensor, torch.Tensor]], ctx_len: int,
                    rows: list[int], encoded: EncodedScore, lps: list[list[float]], greedy: list[bool],
                    adapter_kwargs: Any) -> None:
        """Tokens 1.. of the continuations ``rows``: their tokens but the last fed in one right-padded
        batch on the context's cache repeated per row."""
        from transformers.cache_utils import DynamicCache

        n = len(rows)
        inputs = [encoded.continuations[i][:-1] for i in rows]
        width = max(len(x) for x in inputs)
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, ctx_len + width), dtype=torch.long)
        mask[:, :ctx_len] = 1
        for r, x in enumerate(inputs):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, ctx_len: ctx_len + len(x)] = 1
        positions = (ctx_len + torch.arange(width)).unsqueeze(0).expand(n, width)
        layers = [(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous()) for k, v in base]
        cache = DynamicCache(ddp_cache_data=layers, config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, **adapter_kwargs(n))
        logprobs = F.log_softmax(out.logits.float(), dim=-1)
        for r, i in enumerate(rows):
            cont = encoded.continuations[i]
            for pos, tok in enumerate(cont[1:]):
                row = logprobs[r, pos]
                lps[i].append(float(row[tok]))
                greedy[i] = greedy[i] and int(row.argmax()) == tok


# ----------------------------------------------------------------------------- response shapes


def _chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {"content": [
        {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
        for t in tokens]}


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [({s: lp for s, lp in t.top} if t.logprob is not None else None) for t in tokens],
            "text_offset": offsets}


def merge_deltas(events: list[Event]) -> list[Event]:
    """``events`` with the deltas of each choice merged while its run lasts (text and tokens joined,
    the last finish reason): a finished choice ends its run, and any other event (done, prompt)
    ends every run and keeps its place."""
    out: list[Event] = []
    open_by_index: dict[int, Event] = {}
    for event in events:
        if event.kind != "delta":
            out.append(event)
            open_by_index.clear()
            continue
        acc = open_by_index.get(event.index)
        if acc is not None and acc.finish_reason is None:
            acc.text += event.text
            acc.tokens.extend(event.tokens)  # the event owns its list (the scheduler starts a new one)
            acc.finish_reason = event.finish_reason
            continue
        out.append(event)
        open_by_index[event.index] = event
    return out


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def build_app(engine: TransformersEngineServer) -> FastAPI:
    app = FastAPI(title="modelyard transformers engine")

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel:
        try:
            return model.model_validate(await request.json())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RequestError(f"{where}: {first['msg']}") from None
        except ValueError as exc:
            raise RequestError(f"invalid JSON body: {exc}") from None

    async def prompt_of(messages: list[dict[str, Any]], **kwargs: Any) -> tuple[list[int], dict[str, Any] | None]:
        """``engine.chat_inputs``; off the event loop when images are decoded and processed."""
        if any(isinstance(m.get("content"), list) for m in messages):
            return await asyncio.to_thread(engine.chat_inputs, messages, **kwargs)
        return engine.chat_inputs(messages, **kwargs)

    @app.exception_handler(RequestError)
    async def _bad_request(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, str(exc), param=getattr(exc, "param", None))

    @app.exception_handler(ScoreRequestError)
    async def _bad_score(_request: Request, exc: ScoreRequestError) -> JSONResponse:
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(ModelNotFound)
    async def _not_found(_request: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(RuntimeError)
    async def _failed(_request: Request, exc: RuntimeError) -> JSONResponse:
        return error_response(500, str(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "running": engine.scheduler.running, "waiting": engine.scheduler.waiting})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        names = [engine.served_model_name, *engine.scheduler.adapters]
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": engine.created, "owned_by": "modelyard",
             "max_model_len": engine.max_model_len} for n in names]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatBody = await parse(request, ChatBody)  # type: ignore[assignment]
        adapter = engine.resolve_adapter(body.model)
        tools = tool_calls.resolve(body.tools, body.tool_choice, body.parallel_tool_calls)
        prompt, mm_inputs = await prompt_of(body.messages, add_generation_prompt=body.add_generation_prompt,
                                            tools=body.tools)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        sampling = engine.sampling(body, len(prompt), logprobs=body.logprobs, top_logprobs=top)
        grammar = await engine.grammar(body.response_format, tools)
        req = GenRequest(prompt, sampling, n=body.n, adapter=adapter, loop=asyncio.get_running_loop(),
                         grammar=grammar, mm_inputs=mm_inputs)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            started: set[int] = set()
            # tool calls read out of each choice's text (tool_calls.py) unless tool_choice is none
            readers = {i: tool_calls.ToolCallStream() for i in range(body.n)} if tools.parses else None
            async for ev in engine.stream_events(req) if body.stream else engine.generate(req):
                if ev.kind == "done":
                    if include_usage:
                        yield {**head, "choices": [], "usage": _usage(ev)}
                    return
                if ev.kind != "delta":
                    continue
                deltas: list[dict[str, Any]] = [{"content": ev.text}]
                finish = ev.finish_reason
                if readers is not None:
                    reader = readers[ev.index]
                    deltas = reader.feed(ev.text) + (reader.finish() if finish is not None else [])
                    if not deltas and (finish is not None or body.logprobs or ev.index not in started):
                        deltas = [{"content": ""}]  # the role, the finish reason or logprobs still go out
                    # a named function ends with "stop", as OpenAI (and vLLM) report a forced call
                    finish = "tool_calls" if finish == "stop" and reader.calls and tools.choice != "named" else finish
                for k, delta in enumerate(deltas):
                    if ev.index not in started:
                        started.add(ev.index)
                        delta = {"role": "assistant", **delta}
                    yield {**head, "choices": [{
                        "index": ev.index, "delta": delta, "finish_reason": finish if k == len(deltas) - 1 else None,
                        "logprobs": (_chat_logprobs(ev.tokens if k == 0 else []) if body.logprobs else None)}]}

        if body.stream:
            return StreamingResponse(_stream(chunks()), media_type="text/event-stream")
        return JSONResponse(await _aggregate_chat(chunks(), head, body.n, body.logprobs, req))

    @app.post("/v1/completions")
    async def complete(request: Request):
        body: CompletionBody = await parse(request, CompletionBody)  # type: ignore[assignment]
        adapter = engine.resolve_adapter(body.model)
        if isinstance(body.prompt, list):
            bad = next((t for t in body.prompt if not 0 <= t < engine.vocab_size), None)
            if bad is not None:  # would fail the whole batch's prefill
                raise RequestError(f"prompt: token id {bad} is not in the vocabulary (0-{engine.vocab_size - 1})")
            prompt_ids, prompt_text = body.prompt, engine.tokenizer.decode(body.prompt)
        else:
            prompt_ids, prompt_text = engine.tokenizer.encode(body.prompt), body.prompt
        if not prompt_ids:
            raise RequestError("prompt: must not be empty")
        want_lp = body.logprobs is not None
        sampling = engine.sampling(body, len(prompt_ids), logprobs=want_lp, top_logprobs=body.logprobs or 0,
                                   allow_zero=body.echo)
        req = GenRequest(prompt_ids, sampling, n=body.n, adapter=adapter, prompt_logprobs=body.echo and want_lp,
                         loop=asyncio.get_running_loop(), grammar=await engine.grammar(body.response_format))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            prompt_tokens: list[TokenInfo] = []
            offsets: dict[int, int] = {}
            echoed: set[int] = set()
            async for ev in engine.stream_events(req) if body.stream else engine.generate(req):
                if ev.kind == "prompt":
                    prompt_tokens = ev.tokens
                    continue
                if ev.kind == "done":
                    if include_usage:
                        yield {**head, "choices": [], "usage": _usage(ev)}
                    return
                text, tokens = ev.text, ev.tokens
                if body.echo and ev.index not in echoed:
                    echoed.add(ev.index)
                    text, tokens = prompt_text + text, prompt_tokens + tokens
                start = offsets.get(ev.index, 0)
                offsets[ev.index] = start + len(text)
                yield {**head, "choices": [{
                    "index": ev.index, "text": text, "finish_reason": ev.finish_reason,
                    "logprobs": _completion_logprobs(tokens, start) if want_lp else None}]}

        if body.stream:
            return StreamingResponse(_stream(chunks()), media_type="text/event-stream")
        return JSONResponse(await _aggregate_completion(chunks(), head, body.n, want_lp, req))

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError as exc:
            raise RequestError(f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        adapter = engine.resolve_adapter(body.get("model") or "")
        encoded = engine.encode_score(body)
        lps, greedy = await engine.score(encoded, adapter)
        return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "model": body.get("model") or "",
                             **score_result(encoded, lps, greedy)})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body: TokenizeBody = await parse(request, TokenizeBody)  # type: ignore[assignment]
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("exactly one of prompt and messages is required")
        if body.messages is not None:
            tokens, _ = await prompt_of(body.messages, add_generation_prompt=body.add_generation_prompt)
        else:
            tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body: EmbeddingBody = await parse(request, EmbeddingBody)  # type: ignore[assignment]
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise RequestError("input: every input must be a non-empty string")
        vectors, tokens = await engine.embed(texts)
        if body.dimensions is not None:
            if body.dimensions < 1:
                raise RequestError("dimensions: must be at least 1")
            vectors = [v[: body.dimensions] for v in vectors]
        data = []
        for i, v in enumerate(vectors):
            normed = F.normalize(torch.tensor(v), dim=0).tolist()
            data.append({"object": "embedding", "index": i, "embedding": normed})
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> JSONResponse:
        body: LoadLoraBody = await parse(request, LoadLoraBody)  # type: ignore[assignment]
        await engine.load_adapter(body.lora_name, body.lora_path)
        return JSONResponse({"status": "ok"})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> JSONResponse:
        body: LoadLoraBody = await parse(request, LoadLoraBody)  # type: ignore[assignment]
        await engine.unload_adapter(body.lora_name)
        return JSONResponse({"status": "ok"})

    return app


async def _stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except RuntimeError as exc:  # engine step failed: one error event, like vLLM
        yield _sse({"error": {"message": str(exc), "type": "InternalServerError", "code": 500}})
    yield "data: [DONE]\n\n"


async def _aggregate_chat(chunks, head, n, logprobs, req) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": None,
                "logprobs": {"content": []} if logprobs else None} for i in range(n)]
    usage = None
    calls: dict[int, dict[int, dict[str, Any]]] = {i: {} for i in range(n)}
    async for chunk in chunks:
        usage = chunk.get("usage", usage)
        for c in chunk["choices"]:
            out = choices[c["index"]]
            out["message"]["content"] += c["delta"].get("content") or ""
            tool_calls.merge_delta({"tool_calls": c["delta"].get("tool_calls")}, [], calls[c["index"]])
            out["finish_reason"] = c["finish_reason"] or out["finish_reason"]
            if logprobs:
                out["logprobs"]["content"] += c["logprobs"]["content"]
    for i, choice in enumerate(choices):
        if calls[i]:
            choice["message"]["tool_calls"] = [calls[i][k] for k in sorted(calls[i])]
            choice["message"]["content"] = choice["message"]["content"] or None
    usage = usage or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": req.completion_tokens,
                      "total_tokens": len(req.prompt_ids) + req.completion_tokens}
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}


async def _aggregate_completion(chunks, head, n, logprobs, req) -> dict[str, Any]:
    choices = [{"index": i, "text": "", "finish_reason": None,
                "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if logprobs else None} for i in range(n)]
    usage = None
    async for chunk in chunks:
        usage = chunk.get("usage", usage)
        for c in chunk["choices"]:
            out = choices[c["index"]]
            out["text"] += c["text"]
            out["finish_reason"] = c["finish_reason"] or out["finish_reason"]
            if logprobs:
                for key in out["logprobs"]:
                    out["logprobs"][key] += c["logprobs"][key]
    usage = usage or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": req.completion_tokens,
                      "total_tokens": len(req.prompt_ids) + req.completion_tokens}
    return {**head, "choices": choices, "usage": usage}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--served-model-name", default="base")
    parser.add_argument("--lora", action="append", default=[], metavar="ALIAS=DIR")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--max-model-len", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stream-interval-ms", type=float, default=0.0,
                        help="pacing of streamed answers under load (see services/inference/streaming.py); 0: none")
    parser.add_argument("--stream-max-interval-ms", type=float, default=0.0)
    parser.add_argument("--stream-messages-per-s", type=float, default=0.0)
    parser.add_argument("--stream-pacing-min-streams", type=int, default=1)
    parser.add_argument("--task", default="auto", choices=("auto", "generate", "embedding"),
                        help="embedding: serve an encoder on /v1/embeddings only (engines/embedding.py); "
                             "auto: embedding when the folder is a sentence-transformers or bare-encoder model")
    args = parser.parse_args(argv)

    configure_logging(level="INFO", json=True, service="inference-engine")
    torch.set_num_threads(args.threads)
    from . import embedding

    if args.task == "embedding" or (args.task == "auto" and embedding.is_embedding_model(args.model)):
        embedding.serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
                        dtype=DTYPES[args.dtype], max_model_len=args.max_model_len)
        return
    loras = dict(item.split("=", 1) for item in args.lora)
    engine = TransformersEngineServer(args.model, served_model_name=args.served_model_name, dtype=args.dtype,
                                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                      loras=loras,
                                      pacing=Pacing(args.stream_interval_ms / 1000, args.stream_max_interval_ms / 1000,
                                                    args.stream_messages_per_s, args.stream_pacing_min_streams))
    engine.scheduler.start()
    freeze_startup_heap()
    log.info("engine_listening", host=args.host, port=args.port, model=str(args.model))
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_keep_alive=75)  # the inference service keeps connections to reuse
    engine.scheduler.stop()


if __name__ == "__main__":
    main()
