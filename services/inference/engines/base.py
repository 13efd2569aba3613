"""The ``Engine`` protocol and what both engines share: a supervised child process that serves an
OpenAI-compatible HTTP API on a private loopback port, and the one HTTP client that talks to it.

Requests and responses are OpenAI JSON dicts (the engines' own protocol); the servicer converts
them to and from protos. Streams are async iterators of batches of chunk dicts (what one read of the engine's stream
completed: more than one chunk when the reader fell behind); closing one (the gRPC call was
cancelled) closes the HTTP stream, which makes the engine abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from services.core.errors import DomainError, Internal, InvalidArgument, NotFound, Unavailable, Unimplemented
from services.core.logging import get_logger

from .sse_client import ConnectionLost, SseClient

log = get_logger(__name__)

ENGINE_KINDS = ("vllm", "transformers")
MIN_RATE_WINDOW_S = 0.01  # a stream's rate is measured over at least this long (else it is left out)


@dataclass
class EngineOptions:
    """Engine settings of a deployment; zero values take the engine defaults."""

    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    max_model_len: int = 0
    max_num_seqs: int = 0
    kv_cache_bytes: int = 0
    tensor_parallel_size: int = 0
    max_lora_rank: int = 0
    max_loras: int = 0
    # vLLM --tool-call-parser; empty: chosen from the model folder when the engine starts; "none": no parser
    tool_call_parser: str = ""


@dataclass
class EngineSpec:
    """Everything an engine process needs to serve one deployment."""

    deployment: str  # the deployment id, for logs
    model_dir: Path
    served_model_name: str
    port: int
    workdir: Path  # logs and scratch space of this engine
    options: EngineOptions = field(default_factory=EngineOptions)
    adapters: dict[str, Path] = field(default_factory=dict)  # alias -> local adapter folder
    omp_threads: int = 1
    lora_enabled: bool = False  # vLLM: start with LoRA support (needed for LoadAdapter later)
    task: str = ""  # the registry's model task; "embedding": serve /v1/embeddings only (engines/embedding.py)


class Engine(Protocol):
    """One engine process serving one deployment."""

    endpoint: str

    @property
    def pid(self) -> int | None:
        """The engine process id (None before start)."""

    async def start(self) -> None:
        """Spawn the process (returns at once; ``health`` tells when it serves)."""

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and close the client."""

    async def wait_exit(self) -> int:
        """Wait until the process exits; its exit code."""

    def exit_summary(self) -> str:
        """The last lines the process logged (for a deployment's error)."""

    async def health(self) -> bool:
        """True when the server answers its health check."""

    def chat(self, body: dict[str, Any], *, interval_s: float = 0.0) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream the chunks of an OpenAI chat completion in batches (``stream`` is forced on);
        ``interval_s``: the caller forwards at most one message per that many seconds (its pacing),
        so the engine may send its tokens in groups that fill about one message each."""

    def complete(self, body: dict[str, Any], *, interval_s: float = 0.0) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream the chunks of an OpenAI text completion in batches (``stream`` is forced on;
        ``interval_s`` as for ``chat``)."""

    def paces_stream(self, interval_s: float) -> bool:
        """True when a stream requested with ``interval_s`` comes already paced to it (the caller
        then forwards each batch as it arrives instead of merging them again)."""

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/tokenize``: {tokens, count, max_model_len}."""

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/v1/embeddings``; Unimplemented when the engine has no embeddings for this model."""

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/v1/score`` (our extension of both engine servers): log-likelihoods of continuations of
        one context, ``{scores: [{logprob, is_greedy, token_ids, token_logprobs}], context_tokens,
        usage}``; see ``engines/score_encoding.py`` for the request. A refused request is
        InvalidArgument naming the field (``continuations[2]``)."""

    async def load_adapter(self, alias: str, path: Path) -> None:
        """Add a LoRA adapter served as ``alias``."""

    async def unload_adapter(self, alias: str) -> None:
        """Remove the LoRA adapter ``alias``."""


def _death_signal_setter() -> Callable[[], None] | None:
    """Linux: a function for ``preexec_fn`` that makes the kernel SIGTERM the engine when the inference
    service dies (``PR_SET_PDEATHSIG``), so no engine is orphaned. libc is loaded here, in the parent
    (nothing is loaded between fork and exec). None where there is no such call (logged at each engine start)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; cannot fail for a valid signal

    return die_with_parent


_DIE_WITH_PARENT = _death_signal_setter()


class StreamRate:
    """Tokens per second of one stream of an engine, as its recent streams were decoded: an
    exponential moving average over finished streams of (completion tokens - 1) / (time from the
    first chunk to the usage chunk). It falls when the engine is busier (more streams share it)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.tokens_per_s = 0.0  # 0: nothing measured yet

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 2 or seconds <= 0:
            return
        rate = (tokens - 1) / seconds
        self.tokens_per_s = rate if not self.tokens_per_s else \
            self.tokens_per_s + self.weight * (rate - self.tokens_per_s)

    def tokens_per_message(self, interval_s: float) -> int:
        """How many tokens a stream makes in ``interval_s`` at the measured rate (at least 1)."""
        return max(1, int(self.tokens_per_s * interval_s)) if interval_s > 0 else 1


class HttpEngine:
    """Base of both engines: the child process and the OpenAI HTTP client; subclasses give the command."""

    kind = "engine"
    stop_timeout_s = 15.0

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.endpoint = f"http://127.0.0.1:{spec.port}"
        self._process: asyncio.subprocess.Process | None = None
        self._client = httpx.AsyncClient(
            base_url=self.endpoint,
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64),
        )
        self._sse = SseClient("127.0.0.1", spec.port)  # the token streams (httpx for everything else)
        self.stream_rate = StreamRate()
        self.log_path = spec.workdir / "engine.log"

    # ------------------------------------------------------------------ process

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.spec.omp_threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        return env

    async def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=self.environment(), start_new_session=True, preexec_fn=_DIE_WITH_PARENT,
            )
        if _DIE_WITH_PARENT is None:
            log.warning("engine_orphan_guard_unavailable", deployment=self.spec.deployment,
                        detail="no PR_SET_PDEATHSIG here: an engine outlives a killed inference service")
        log.info("engine_started", engine=self.kind, deployment=self.spec.deployment, pid=self._process.pid,
                 endpoint=self.endpoint, log=str(self.log_path))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def wait_exit(self) -> int:
        assert self._process is not None
        return await self._process.wait()

    def exit_summary(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip()[:300] for line in text[-lines:])

    async def stop(self) -> None:
        proc = self._process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            log.info("engine_stopped", engine=self.kind, deployment=self.spec.deployment, code=proc.returncode)
        await self._client.aclose()
        await self._sse.aclose()

    # ------------------------------------------------------------------ HTTP

    async def health(self) -> bool:
        try:
            resp = await self._client.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def chat(self, body: dict[str, Any], *, interval_s: float = 0.0) -> AsyncIterator[list[dict[str, Any]]]:
        # the fields are chosen now, with paces_stream's answer for the same rate (not at the first read)
        return self._stream("/v1/chat/completions", {**body, **self.stream_fields(interval_s)})

    def complete(self, body: dict[str, Any], *, interval_s: float = 0.0) -> AsyncIterator[list[dict[str, Any]]]:
        return self._stream("/v1/completions", {**body, **self.stream_fields(interval_s)})

    def stream_fields(self, interval_s: float) -> dict[str, Any]:
        """Fields added to a streamed request whose caller paces at ``interval_s`` (none by default)."""
        return {}

    def paces_stream(self, interval_s: float) -> bool:
        return False

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/tokenize", body)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._post("/v1/embeddings", body)
        except NotFound as exc:
            if exc.reason == "ENGINE_ROUTE_NOT_FOUND":
                raise Unimplemented(f"the {self.kind} engine serves no embeddings for this model",
                                    reason="EMBEDDINGS_UNSUPPORTED") from None
            raise

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._post("/v1/score", body)
        except NotFound as exc:
            if exc.reason == "ENGINE_ROUTE_NOT_FOUND":
                raise Unimplemented(f"the {self.kind} engine of this deployment serves no scores",
                                    reason="SCORE_UNSUPPORTED") from None
            raise

    async def load_adapter(self, alias: str, path: Path) -> None:
        await self._post("/v1/load_lora_adapter", {"lora_name": alias, "lora_path": str(path)})

    async def unload_adapter(self, alias: str) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": alias})

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        if resp.status_code != 200:
            raise _http_error(resp.status_code, resp.content, self.kind)
        try:
            return resp.json()
        except ValueError:
            return {}

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        stream = self._sse.stream(path, body)
        loop = asyncio.get_running_loop()
        started: float | None = None  # loop time of the first chunk
        try:
            async for status, payload in stream:
                if status != 200:
                    raise _http_error(status, payload, self.kind)
                failed = next((i for i, chunk in enumerate(payload) if "error" in chunk), None)
                if failed is not None:
                    if failed:
                        yield payload[:failed]
                    raise _error_from_body(payload[failed], 500, self.kind)
                if started is None:
                    started = loop.time()
                elif payload and (usage := payload[-1].get("usage")) and (body.get("n") or 1) == 1:
                    # n > 1: the choices share the time; the first chunk and the usage read apart
                    # (not one burst the reader caught up on)
                    elapsed = loop.time() - started
                    if elapsed >= MIN_RATE_WINDOW_S:
                        self.stream_rate.observe(usage.get("completion_tokens") or 0, elapsed)
                yield payload
        except ConnectionLost as exc:
            raise Unavailable(f"{self.kind} engine closed the stream before it ended ({exc})",
                              reason="ENGINE_UNAVAILABLE") from None
        except (OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from None
        finally:
            await stream.aclose()

    def _unavailable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"{self.kind} engine of deployment {self.spec.deployment!r} is not answering: "
                           f"{type(exc).__name__}: {exc}".rstrip(": "), reason="ENGINE_UNAVAILABLE")


def _message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if payload.get(key):
                return str(payload[key])
    return None


def _error_from_body(payload: Any, status: int, kind: str) -> DomainError:
    message = _message(payload) or f"{kind} engine answered HTTP {status}"
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), int):  # mid-stream errors carry their status
        status = err["code"]
    if status in (400, 422):
        param = err.get("param") if isinstance(err, dict) else None
        if isinstance(param, str) and param and message.startswith(f"{param}: "):
            return InvalidArgument.for_field(param, message.removeprefix(f"{param}: "),
                                             reason="ENGINE_REJECTED_REQUEST")
        return InvalidArgument(message, reason="ENGINE_REJECTED_REQUEST")
    if status == 404:
        return NotFound(message, reason="ENGINE_MODEL_NOT_FOUND")
    if status == 503:
        return Unavailable(message, reason="ENGINE_UNAVAILABLE")
    return Internal(f"{kind} engine failed: {message}", reason="ENGINE_ERROR")


def _http_error(status: int, content: bytes, kind: str) -> DomainError:
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if status == 404 and _message(payload) in (None, "Not Found"):
        return NotFound(f"{kind} engine has no such route", reason="ENGINE_ROUTE_NOT_FOUND")
    if payload is None:
        payload = {"message": content.decode(errors="replace")[:500]}
    return _error_from_body(payload, status, kind)
