"""Embedding models on the transformers engine: a sentence-transformers folder (or a bare encoder
such as ``BertModel``) served on ``/v1/embeddings`` the way sentence-transformers computes it.

The folder's own description is followed:

- ``modules.json``: ``Transformer`` -> ``Pooling`` -> optional ``Dense`` layers -> optional ``Normalize``
  (any other module type refuses to load, naming it);
- ``1_Pooling/config.json`` (or whatever path modules.json gives): the pooling mode(s) ``cls``, ``mean``,
  ``max``, ``mean_sqrt_len_tokens``, ``weightedmean``, ``lasttoken`` (new ``pooling_mode`` key or the legacy
  ``pooling_mode_*_token(s)`` booleans; several modes are concatenated, in their order);
- ``sentence_bert_config.json``: ``max_seq_length`` (inputs longer than that are TRUNCATED to it, like
  sentence-transformers does; ``usage`` counts the tokens actually embedded) and ``do_lower_case``;
- ``config_sentence_transformers.json``: the default prompt (``prompts[default_prompt_name]``), prepended
  to every input;
- ``dimensions``: the model's size is always accepted; a smaller size only where the model declares
  Matryoshka training (config.json ``matryoshka_dimensions`` [list] or ``is_matryoshka: true``, the keys
  vLLM reads): the vector is truncated, then normalised again when the model normalises. Anything else is
  a 400 naming ``dimensions``.

A folder without modules.json whose architecture is an encoder (``BertModel``, ``XLMRobertaModel``...)
is served with mean pooling and normalisation (sentence-transformers' own default for a bare model).

An embedding deployment refuses ``/v1/chat/completions``, ``/v1/completions``, ``/v1/score`` and adapters
with a 400 naming ``model``. (A causal LM asked for embeddings keeps the engine's mean-pooled last hidden
states, ``TransformersEngineServer.embed``.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.core.logging import get_logger

log = get_logger(__name__)

EMBEDDING_TASK = "embedding"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_PREFIXES = ("sentence_transformers.models.", "sentence_transformers.sentence_transformer.modules.")
_GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "ForSeq2SeqLM")
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "Sigmoid": torch.sigmoid,
    "GELU": F.gelu,
    "SiLU": F.silu,
}
BATCH_SIZE = 32  # texts per forward pass (sorted by length, so padding stays small)


class EmbeddingModelError(Exception):
    """The folder is not an embedding model this engine can serve (the engine exits with this message)."""


class EmbeddingRequestError(Exception):
    """A request the model refuses (HTTP 400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingModelError(f"{path.name}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict | list):
        raise EmbeddingModelError(f"{path.name}: must be a JSON object")
    return doc  # type: ignore[return-value]


def is_embedding_model(folder: Path) -> bool:
    """Whether ``folder`` is an embedding model: a sentence-transformers folder (modules.json), or a
    config.json whose architectures are all bare encoders (none generates text)."""
    if (folder / "modules.json").is_file():
        return True
    if not (folder / "config.json").is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = (config.get("architectures") or []) if isinstance(config, dict) else []
    return bool(archs) and all(
        isinstance(a, str) and a.endswith("Model") and not a.endswith(_GENERATIVE_SUFFIXES) for a in archs
    )


@dataclass(frozen=True)
class DenseLayer:
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.activation](
            F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        )


@dataclass
class EmbeddingConfig:
    """How a folder turns texts into vectors (read from its files only)."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int = 0  # 0: the tokenizer's / the model's limit
    do_lower_case: bool = False
    prompt: str = ""
    include_prompt: bool = True
    dense: list[Path] = field(default_factory=list)  # Dense module folders, in order
    matryoshka: tuple[int, ...] | None = None  # None: only the full size; (): any size up to it


def _pooling_modes(doc: dict[str, Any], where: str) -> tuple[str, ...]:
    mode = doc.get("pooling_mode")
    if mode is None:
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if doc.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if not modes:
        raise EmbeddingModelError(f"{where}: no pooling mode is set")
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise EmbeddingModelError(f"{where}: unknown pooling mode {bad[0]!r} (known: {', '.join(POOLING_MODES)})")
    return modes


def read_config(folder: Path) -> EmbeddingConfig:
    """The embedding pipeline ``folder`` declares; EmbeddingModelError naming the file when it cannot be served."""
    cfg = EmbeddingConfig()
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list) or not modules:
            raise EmbeddingModelError("modules.json: must be a non-empty list of modules")
        kinds: list[str] = []
        cfg.normalize = False
        for i, module in enumerate(modules):
            kind = str(module.get("type", "")) if isinstance(module, dict) else ""
            for prefix in _MODULE_PREFIXES:
                kind = kind.removeprefix(prefix)
            kind = kind.rsplit(".", 1)[-1]
            path = folder / str(module.get("path") or "") if isinstance(module, dict) else folder
            if kind == "Transformer" and i == 0:
                pass
            elif kind == "Pooling" and kinds == ["Transformer"]:
                doc = _read_json(path / "config.json")
                cfg.pooling = _pooling_modes(doc, f"{module.get('path')}/config.json")
                cfg.include_prompt = bool(doc.get("include_prompt", True))
            elif kind == "Dense" and "Pooling" in kinds and "Normalize" not in kinds:
                cfg.dense.append(path)
            elif kind == "Normalize" and "Pooling" in kinds:
                cfg.normalize = True
            else:
                raise EmbeddingModelError(
                    f"modules.json: module {i} ({module.get('type') if isinstance(module, dict) else module!r}) "
                    "is not supported by the transformers engine (supported: Transformer, "
                    "Pooling, Dense, Normalize, in that order)"
                )
            kinds.append(kind)
        if kinds[:2] != ["Transformer", "Pooling"]:
            raise EmbeddingModelError("modules.json: a Transformer module followed by a Pooling module is required")
    if (folder / "sentence_bert_config.json").is_file():
        sbert = _read_json(folder / "sentence_bert_config.json")
        cfg.max_seq_length = int(sbert.get("max_seq_length") or 0)
        cfg.do_lower_case = bool(sbert.get("do_lower_case", False))
    if (folder / "config_sentence_transformers.json").is_file():
        st = _read_json(folder / "config_sentence_transformers.json")
        prompts = st.get("prompts") or {}
        default = st.get("default_prompt_name")
        if default:
            if not isinstance(prompts, dict) or default not in prompts:
                raise EmbeddingModelError(
                    f"config_sentence_transformers.json: default_prompt_name {default!r} is not one of its prompts"
                )
            cfg.prompt = str(prompts[default])
    if cfg.prompt and not cfg.include_prompt:
        raise EmbeddingModelError("a default prompt with include_prompt=false pooling is not supported")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    dims = config.get("matryoshka_dimensions")
    if isinstance(dims, list) and dims:
        cfg.matryoshka = tuple(sorted({int(d) for d in dims}))
    elif config.get("is_matryoshka"):
        cfg.matryoshka = ()
    return cfg


def _load_dense(path: Path) -> DenseLayer:
    doc = _read_json(path / "config.json")
    activation = str(doc.get("activation_function") or "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise EmbeddingModelError(
            f"{path.name}/config.json: activation {activation!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    else:
        raise EmbeddingModelError(f"{path.name}: the Dense layer needs model.safetensors")
    weight = state.get("linear.weight")
    if weight is None:
        raise EmbeddingModelError(f"{path.name}/model.safetensors: no linear.weight tensor")
    return DenseLayer(weight.float(), state.get("linear.bias"), activation)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Sentence vectors of token vectors ``hidden`` [batch, seq, dim] under ``mask`` [batch, seq]
    (1: a real token), the modes concatenated; sentence-transformers' Pooling for right or left padding."""
    out: list[torch.Tensor] = []
    hidden = hidden.float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    seq_len = hidden.shape[1]
    for mode in modes:
        if mode == "cls":
            first = mask.to(torch.int).argmax(dim=1)
            out.append(hidden[torch.arange(hidden.shape[0]), first])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = m.sum(dim=1).clamp(min=1e-9)
            out.append((hidden * m).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            pad = mask.to(torch.int32).argmax(dim=1)  # left padding: weights start at the first real token
            weights = torch.arange(1, seq_len + 1, dtype=hidden.dtype).view(1, -1, 1) - pad.view(-1, 1, 1)
            wm = m * weights
            out.append((hidden * wm).sum(dim=1) / wm.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            values, idx = mask.flip(1).max(1)
            idx = torch.where(values == 0, seq_len - 1, idx)
            out.append((hidden * m)[torch.arange(hidden.shape[0]), seq_len - idx - 1])
        else:  # read_config only lets known modes through
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


def fit_dimensions(
    vectors: torch.Tensor, dimensions: int | None, *, full: int, normalize: bool, matryoshka: tuple[int, ...] | None
) -> torch.Tensor:
    """``vectors`` cut to ``dimensions`` where the model allows it (see the module docstring)."""
    if dimensions is None or dimensions == full:
        return vectors
    if dimensions < 1:
        raise EmbeddingRequestError("dimensions", f"must be at least 1, got {dimensions}")
    if matryoshka is None:
        raise EmbeddingRequestError(
            "dimensions",
            f"this model only produces {full}-dimensional embeddings (it "
            f"declares no Matryoshka dimensions); got {dimensions}",
        )
    if dimensions > full or (matryoshka and dimensions not in matryoshka):
        allowed = ", ".join(str(d) for d in matryoshka) if matryoshka else f"1 to {full}"
        raise EmbeddingRequestError("dimensions", f"must be one of {allowed} for this model, got {dimensions}")
    cut = vectors[:, :dimensions]
    return F.normalize(cut, p=2, dim=-1) if normalize else cut


class EmbeddingModel:
    """An encoder and its pipeline; ``embed`` runs in one worker thread (one forward pass at a time)."""

    def __init__(self, folder: Path, *, dtype: Any = "auto", max_model_len: int = 0) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.config = read_config(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        kwargs: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
        self.model = AutoModel.from_pretrained(folder, **kwargs)
        self.model.eval()
        self.dense = [_load_dense(p) for p in self.config.dense]
        limits = [
            n
            for n in (
                self.config.max_seq_length,
                getattr(self.model.config, "max_position_embeddings", 0),
                self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**6 else 0,
                max_model_len,
            )
            if n
        ]
        self.max_seq_length = min(limits) if limits else 512
        with torch.no_grad():
            self.dimensions = int(self._forward(["dimension probe"])[0].shape[-1])
        self.running = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """Unnormalised-then-normalised (per the pipeline) vectors of ``texts`` and the tokens they used."""
        if self.config.prompt:
            texts = [self.config.prompt + t for t in texts]
        if self.config.do_lower_case:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            texts, padding=True, truncation="longest_first", max_length=self.max_seq_length, return_tensors="pt"
        )
        out = self.model(**enc)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        vectors = pool(hidden, enc["attention_mask"], self.config.pooling)
        for layer in self.dense:
            vectors = layer(vectors)
        if self.config.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors, int(enc["attention_mask"].sum())

    def embed_sync(self, texts: list[str], dimensions: int | None = None) -> tuple[list[list[float]], int]:
        # the dimensions are checked before any work is done
        fit_dimensions(
            torch.zeros(1, self.dimensions),
            dimensions,
            full=self.dimensions,
            normalize=self.config.normalize,
            matryoshka=self.config.matryoshka,
        )
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        result: list[list[float]] = [[] for _ in texts]
        tokens = 0
        with torch.no_grad():
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                vectors, used = self._forward([texts[i] for i in idx])
                tokens += used
                vectors = fit_dimensions(
                    vectors,
                    dimensions,
                    full=self.dimensions,
                    normalize=self.config.normalize,
                    matryoshka=self.config.matryoshka,
                )
                for i, v in zip(idx, vectors.tolist(), strict=True):
                    result[i] = v
        return result, tokens

    async def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[list[list[float]], int]:
        self.running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.embed_sync, texts, dimensions)
        finally:
            self.running -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def build_embedding_app(model: EmbeddingModel, served_model_name: str) -> FastAPI:
    """The engine's HTTP API for an embedding model (the same routes as the generation app; the
    generation ones refuse)."""
    app = FastAPI(title="modelyard transformers engine (embedding)")
    created = int(time.time())

    @app.exception_handler(EmbeddingRequestError)
    async def _bad(_request: Request, exc: EmbeddingRequestError) -> JSONResponse:
        return _error(400, str(exc), exc.param)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise EmbeddingRequestError("body", f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise EmbeddingRequestError("body", "must be a JSON object")
        name = body.get("model") or ""
        if name and name != served_model_name:
            raise EmbeddingRequestError(
                "model", f"the model `{name}` does not exist here (this engine serves `{served_model_name}`)"
            )
        return body

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "running": model.running, "waiting": 0, "task": EMBEDDING_TASK})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": served_model_name,
                        "object": "model",
                        "created": created,
                        "owned_by": "modelyard",
                        "max_model_len": model.max_seq_length,
                        "task": EMBEDDING_TASK,
                        "dimensions": model.dimensions,
                    }
                ],
            }
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await body_of(request)
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise EmbeddingRequestError("input", "a non-empty string or a non-empty list of non-empty strings")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
            raise EmbeddingRequestError("dimensions", "must be an integer")
        vectors, tokens = await model.embed(texts, dimensions)
        return JSONResponse(
            {
                "object": "list",
                "model": served_model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    refusal = (
        f"`{served_model_name}` is an embedding model: it serves /v1/embeddings only (no chat, "
        "completions, scores or adapters)"
    )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await body_of(request)
        if body.get("messages") is not None:
            raise EmbeddingRequestError("model", refusal)
        if not isinstance(body.get("prompt"), str):
            raise EmbeddingRequestError("prompt", "must be a string")
        tokens = model.tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": model.max_seq_length})

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    @app.post("/v1/score")
    @app.post("/v1/load_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def refused() -> JSONResponse:
        return _error(400, f"model: {refusal}", "model")

    return app


def serve(model_dir: Path, *, host: str, port: int, served_model_name: str, dtype: Any, max_model_len: int) -> None:
    """Load the embedding model and serve it until stopped (the transformers engine's ``--task embedding``)."""
    import sys

    import uvicorn

    from services.core.runtime import freeze_startup_heap

    try:
        model = EmbeddingModel(model_dir, dtype=dtype, max_model_len=max_model_len)
    except EmbeddingModelError as exc:
        log.error("embedding_model_unsupported", model=str(model_dir), error=str(exc))
        print(f"cannot serve {model_dir} as an embedding model: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    freeze_startup_heap()
    log.info(
        "engine_listening",
        host=host,
        port=port,
        model=str(model_dir),
        task=EMBEDDING_TASK,
        dimensions=model.dimensions,
        max_seq_length=model.max_seq_length,
        pooling=list(model.config.pooling),
        normalize=model.config.normalize,
    )
    try:
        uvicorn.run(
            build_embedding_app(model, served_model_name),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=75,
        )
    finally:
        model.close()
