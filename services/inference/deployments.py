"""Deployments: a model version (plus LoRA adapters) served by a supervised engine process.

``Deployments`` is the domain of the inference service. Deploy resolves the versions in the
registry, stores the deployment (SQLite by default, so a restarted service redeploys it), marks
the versions as deployed and returns at once in CREATING; a supervisor task per deployment pulls
the files into the local cache, starts the engine and reports READY only when the engine answers
its health check and a one-token generation. An engine that dies or stops answering is restarted
with exponential backoff (DEGRADED meanwhile, READY again when it answers); after
``max_start_failures`` failed starts in a row the deployment is FAILED with the last error.
"""

from __future__ import annotations

import asyncio
import builtins
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import select

from modelyard.registry.v1 import registry_pb2 as rpb
from services.core import listing
from services.core.artifacts import FileEntry, Manifest
from services.core.db import Database, utcnow
from services.core.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.core.logging import get_logger
from services.core.vision import vision_info

from .cache import ModelCache
from .engines.base import ENGINE_KINDS, Engine, EngineOptions, EngineSpec
from .engines.tool_parsers import resolve_tool_parser, valid_parsers
from .engines.transformers_engine import TransformersEngine
from .engines.vllm_engine import VISION_UNSUPPORTED, VllmEngine, check_vllm_installed, check_vllm_serves_vision
from .metrics import ENGINE_RESTARTS, TASK_ERRORS
from .settings import InferenceSettings
from .tables import DeploymentRow

log = get_logger(__name__)

DEPLOYMENT_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^models/[^/]+/versions/[^/]+$")
DTYPES = ("auto", "bfloat16", "float16", "float32")
READY_PROMPT = "Hello"
EMBEDDING_TASK = "embedding"  # the registry's ModelMetadata.task of an embedding model
# An engine that stayed up this long (s) restarts after the initial backoff again.
STABLE_UPTIME_S = 60.0
HEALTH_FAILURES_BEFORE_RESTART = 3


class ModelSource(Protocol):
    """The registry calls deployments make: ``modelyard.client.RegistryClient`` (or a fake in a unit test)."""

    async def get_model_version(self, name: str) -> rpb.ModelVersion: ...
    async def set_deployment_marker(self, name: str, *, deployment: str, deployed: bool) -> Any: ...


@dataclass(frozen=True)
class VersionInfo:
    """What a deployment needs of a registry model version."""

    name: str
    is_adapter: bool
    ready: bool
    artifact_prefix: str
    manifest: Manifest
    task: str = ""  # the registry's metadata.task: "embedding" deployments serve embeddings only
    vision: bool = False  # the registry's metadata says it is a vision-language model

    @classmethod
    def of(cls, v: rpb.ModelVersion) -> VersionInfo:
        return cls(name=v.name, is_adapter=v.kind == rpb.MODEL_KIND_ADAPTER,
                   ready=v.state == rpb.MODEL_VERSION_STATE_READY, artifact_prefix=v.artifact_prefix,
                   manifest=Manifest([FileEntry(f.path, f.size_bytes, f.sha256) for f in v.files]),
                   task=v.metadata.task, vision=v.metadata.HasField("vision"))


async def _get_version(source: ModelSource, name: str) -> VersionInfo:
    return VersionInfo.of(await source.get_model_version(name))


class State(StrEnum):
    CREATING = "CREATING"
    READY = "READY"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    DELETING = "DELETING"


@dataclass
class AdapterRecord:
    alias: str
    model_version: str
    artifact_prefix: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)  # manifest entries {path, size, sha256}

    @property
    def manifest(self) -> Manifest:
        return Manifest([FileEntry(**f) for f in self.files])


@dataclass
class DeploymentRecord:
    """What is stored about a deployment (everything needed to start it again)."""

    name: str
    model_version: str
    engine: str
    options: EngineOptions = field(default_factory=EngineOptions)
    adapters: list[AdapterRecord] = field(default_factory=list)
    replicas: int = 1
    served_model_name: str = ""
    artifact_prefix: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    create_time: datetime = field(default_factory=utcnow)
    update_time: datetime = field(default_factory=utcnow)
    task: str = ""  # the model version's task ("embedding": probed and served as an embedding model)

    @property
    def deployment_id(self) -> str:
        return self.name.removeprefix("deployments/")

    @property
    def model_name(self) -> str:
        """The name the engine serves the base model under (OpenAI ``model``)."""
        return self.served_model_name or self.deployment_id

    @property
    def manifest(self) -> Manifest:
        return Manifest([FileEntry(**f) for f in self.files])

    def spec_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("name", "create_time", "update_time"):
            data.pop(key)
        return data

    @classmethod
    def from_row(cls, row: DeploymentRow) -> DeploymentRecord:
        spec = dict(row.spec)
        spec["options"] = EngineOptions(**spec.get("options", {}))
        spec["adapters"] = [AdapterRecord(**a) for a in spec.get("adapters", [])]
        return cls(name=row.name, create_time=_aware(row.create_time), update_time=_aware(row.update_time), **spec)


@dataclass
class DeploymentView:
    """A deployment as callers see it: the record plus its live state."""

    record: DeploymentRecord
    state: State
    endpoints: list[str]
    error: DomainError | None
    update_time: datetime


EngineFactory = Callable[[str, EngineSpec], Engine]


def _aware(dt: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were stored in UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _files_of(manifest: Manifest) -> list[dict[str, Any]]:
    return [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]


def parse_name(name: str, field_name: str = "name") -> str:
    """``deployments/{id}`` -> id; InvalidArgument naming ``field_name`` otherwise."""
    if not name.startswith("deployments/") or not DEPLOYMENT_ID_RE.match(name.removeprefix("deployments/")):
        raise InvalidArgument.for_field(field_name, f"must be deployments/{{deployment}} with a lowercase id of "
                                                    f"letters, digits and hyphens, got {name!r}")
    return name.removeprefix("deployments/")


class _Runner:
    """Supervises the engine of one deployment (one replica)."""

    def __init__(self, owner: Deployments, record: DeploymentRecord) -> None:
        self.owner = owner
        self.record = record
        self.state = State.CREATING
        self.error: DomainError | None = None
        self.engine: Engine | None = None
        self.lora_enabled = bool(record.adapters) or record.options.max_loras > 0
        self.update_time = utcnow()
        self.lock = asyncio.Lock()  # serialises adapter changes
        self.task: asyncio.Task | None = None
        self.tool_call_parser = ""  # the parser the engine runs with (resolved when it starts)
        self.vision = False  # the model folder is a vision-language model's (known once the engine started)

    def set_state(self, state: State, error: DomainError | None = None) -> None:
        if error is not None:
            self.error = error
        if state != self.state:
            log.info("deployment_state", deployment=self.record.name, state=state.value,
                     error=error.message if error else None)
            self.state = state
            self.update_time = utcnow()
            self.owner.changed()

    def view(self) -> DeploymentView:
        endpoints = [self.engine.endpoint] if self.engine is not None and self.state == State.READY else []
        record = replace(self.record)
        if self.tool_call_parser and not record.options.tool_call_parser:  # the one chosen for it
            record.options = replace(record.options, tool_call_parser=self.tool_call_parser)
        return DeploymentView(record, self.state, endpoints, self.error,
                              max(self.update_time, self.record.update_time))

    async def run(self) -> None:
        settings = self.owner.settings
        delay = settings.restart_backoff_initial_s
        failures = 0
        ever_ready = False
        while True:
            engine: Engine | None = None
            try:
                engine = await self._start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failed start is retried, then FAILED
                failures += 1
                err = exc if isinstance(exc, DomainError) else Internal(f"engine start failed: {exc}")
                if not isinstance(exc, DomainError):
                    log.exception("engine_start_failed", deployment=self.record.name)
                if failures >= settings.max_start_failures or err.reason == VISION_UNSUPPORTED:  # no retry helps
                    self.set_state(State.FAILED, err)
                    return
                self.set_state(State.DEGRADED if ever_ready else State.CREATING, err)
                log.warning("engine_restart_scheduled", deployment=self.record.name, failures=failures,
                            delay_s=delay, error=err.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.restart_backoff_max_s)
                continue
            failures = 0
            ever_ready = True
            self.engine = engine
            self.set_state(State.READY)
            started = time.monotonic()
            try:
                err = await self._watch(engine)
            except Exception as exc:  # noqa: BLE001 - a failed watch must not leave the engine unsupervised
                TASK_ERRORS.labels("supervisor", type(exc).__name__).inc()
                log.exception("engine_watch_failed", deployment=self.record.name)
                err = Internal(f"engine supervision failed: {type(exc).__name__}: {exc}", reason="SUPERVISOR_ERROR")
            finally:
                self.engine = None
                await self._stop_engine(engine)
            if time.monotonic() - started > STABLE_UPTIME_S:
                delay = settings.restart_backoff_initial_s
            ENGINE_RESTARTS.labels(self.record.deployment_id, err.reason).inc()
            self.set_state(State.DEGRADED, err)
            log.warning("engine_restart_scheduled", deployment=self.record.name, delay_s=delay, error=err.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.restart_backoff_max_s)

    async def _stop_engine(self, engine: Engine) -> None:
        """Stop ``engine``; a failure to stop it is logged and counted (the next engine gets a new port)."""
        try:
            await engine.stop()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            TASK_ERRORS.labels("engine_stop", type(exc).__name__).inc()
            log.exception("engine_stop_failed", deployment=self.record.name, pid=engine.pid)

    async def _start(self) -> Engine:
        """Files into the cache, engine process started, answering: the engine; raises otherwise."""
        owner, rec = self.owner, self.record
        model_dir = await asyncio.to_thread(owner.cache.ensure, rec.artifact_prefix, rec.manifest)
        self.vision = await asyncio.to_thread(vision_info, model_dir) is not None
        if self.vision and rec.engine == "vllm":
            check_vllm_serves_vision(owner.settings.vllm_python, rec.model_version)
        adapters = {}
        for a in rec.adapters:
            adapters[a.alias] = await asyncio.to_thread(owner.cache.ensure, a.artifact_prefix, a.manifest)
        parser = "" if rec.task == EMBEDDING_TASK else \
            await asyncio.to_thread(resolve_tool_parser, rec.options.tool_call_parser, rec.engine, model_dir)
        if parser != self.tool_call_parser:
            log.info("tool_call_parser_resolved", deployment=rec.name, parser=parser,
                     chosen=not rec.options.tool_call_parser)
            self.tool_call_parser = parser
            owner.changed()
        spec = EngineSpec(
            deployment=rec.deployment_id, model_dir=model_dir, served_model_name=rec.model_name,
            port=owner.allocate_port(), workdir=owner.settings.engines_dir() / rec.deployment_id,
            options=replace(rec.options, tool_call_parser=parser), adapters=adapters,
            omp_threads=owner.settings.omp_threads,
            lora_enabled=self.lora_enabled, task=rec.task,
        )
        engine = owner.engine_factory(rec.engine, spec)
        try:
            await engine.start()
            await self._wait_ready(engine)
        except BaseException:
            await self._stop_engine(engine)
            raise
        log.info("engine_ready", deployment=rec.name, endpoint=engine.endpoint)
        return engine

    async def _wait_ready(self, engine: Engine) -> None:
        """Health, then a one-token generation; the process exiting or the timeout fails the start."""
        deadline = time.monotonic() + self.owner.settings.engine_start_timeout_s
        exited = asyncio.ensure_future(engine.wait_exit())
        last_error = ""  # why the last one-token generation failed
        try:
            while time.monotonic() < deadline:
                if exited.done():
                    raise Unavailable(f"engine exited with code {exited.result()} while starting: "
                                      f"{engine.exit_summary()}", reason="ENGINE_EXITED")
                if await engine.health():
                    try:
                        if self.record.task == EMBEDDING_TASK:  # an embedding model generates nothing
                            await engine.embed({"model": self.record.model_name, "input": [READY_PROMPT]})
                            return
                        async for _ in engine.complete({"model": self.record.model_name, "prompt": READY_PROMPT,
                                                        "max_tokens": 1, "temperature": 0}):
                            pass
                        return
                    except Unavailable as err:  # answering /health but not generating yet: asked again
                        if err.message != last_error:
                            log.info("engine_not_ready", deployment=self.record.name, reason=err.reason,
                                     error=err.message)
                        TASK_ERRORS.labels("engine_ready_probe", err.reason).inc()
                        last_error = err.message
                await asyncio.wait({exited}, timeout=0.5)
            detail = f"; its last one-token generation failed: {last_error}" if last_error else ""
            raise Unavailable(f"engine did not answer within {self.owner.settings.engine_start_timeout_s:.0f}s"
                              f"{detail}: {engine.exit_summary()}", reason="ENGINE_START_TIMEOUT")
        finally:
            exited.cancel()

    async def _watch(self, engine: Engine) -> DomainError:
        """Wait until the engine dies or stops answering; why."""
        exited = asyncio.ensure_future(engine.wait_exit())
        misses = 0
        try:
            while True:
                await asyncio.wait({exited}, timeout=self.owner.settings.health_interval_s)
                if exited.done():
                    return Unavailable(f"engine exited with code {exited.result()}: {engine.exit_summary()}",
                                       reason="ENGINE_EXITED")
                misses = 0 if await engine.health() else misses + 1
                if misses >= HEALTH_FAILURES_BEFORE_RESTART:
                    return Unavailable(f"engine stopped answering its health check ({misses} misses)",
                                       reason="ENGINE_UNHEALTHY")
        finally:
            exited.cancel()

    async def stop(self) -> None:
        """Cancel the supervisor and wait until it stopped its engine (how the task ended is reported
        by ``Deployments._supervisor_done``; a cancellation of the caller is passed on)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task})


class Deployments:
    """Deploy / get / list / undeploy, adapters, and the engine behind each data-plane call."""

    def __init__(self, db: Database, source: ModelSource, cache: ModelCache, settings: InferenceSettings,
                 engine_factory: EngineFactory | None = None) -> None:
        self.db = db
        self.source = source
        self.cache = cache
        self.settings = settings
        self.engine_factory = engine_factory or self._default_factory
        self._runners: dict[str, _Runner] = {}
        self._deleting: set[str] = set()
        self._lock = asyncio.Lock()
        self._listeners: builtins.list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously, in the loop) whenever a deployment appears, changes state or goes."""
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception as exc:  # noqa: BLE001 - a listener must not break the supervisor that called it
                TASK_ERRORS.labels("change_listener", type(exc).__name__).inc()
                log.exception("deployment_listener_failed")

    def readiness(self) -> dict[str, bool]:
        """Each deployment's name and whether it is READY now."""
        return {name: r.state == State.READY for name, r in self._runners.items()}

    # ------------------------------------------------------------------ lifecycle

    async def recover(self) -> int:
        """Start every stored deployment (after a restart of the service); how many."""
        with self.db.session() as s:
            records = [DeploymentRecord.from_row(r) for r in s.scalars(select(DeploymentRow))]
        for record in records:
            self._launch(record)
        if records:
            log.info("deployments_recovered", count=len(records))
        return len(records)

    async def close(self) -> None:
        """Stop every engine; the deployments stay stored and come back with ``recover``."""
        await asyncio.gather(*(r.stop() for r in self._runners.values()))
        self._runners.clear()
        self.changed()

    def _launch(self, record: DeploymentRecord) -> _Runner:
        runner = _Runner(self, record)
        runner.task = asyncio.create_task(runner.run(), name=f"deployment:{record.name}")
        runner.task.add_done_callback(lambda task: self._supervisor_done(runner, task))
        self._runners[record.name] = runner
        self.changed()
        return runner

    def _supervisor_done(self, runner: _Runner, task: asyncio.Task) -> None:
        """A supervisor that ended with an error (a bug: it handles its engine's failures) leaves its
        deployment FAILED with that error, logged and counted, rather than READY with nobody watching."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        TASK_ERRORS.labels("supervisor", type(exc).__name__).inc()
        log.error("deployment_supervisor_failed", deployment=runner.record.name, error=f"{type(exc).__name__}: {exc}",
                  exc_info=exc)
        runner.engine = None
        runner.set_state(State.FAILED, Internal(f"the deployment's supervisor failed: {type(exc).__name__}: {exc}",
                                                reason="SUPERVISOR_FAILED"))

    def _default_factory(self, kind: str, spec: EngineSpec) -> Engine:
        if kind == "vllm":
            check_vllm_installed(self.settings.vllm_python)
            return VllmEngine(spec, vllm_python=self.settings.vllm_python.absolute(),
                              cpu_kv_cache_gib=self.settings.vllm_cpu_kv_cache_gib,
                              block_size=self.settings.vllm_block_size)
        return TransformersEngine(spec, default_max_num_seqs=self.settings.transformers_max_num_seqs,
                                  pacing=self.settings.pacing())

    def allocate_port(self) -> int:
        """A free loopback port in the configured range (any free port when the range is 0-0)."""
        lo, hi = self.settings.engine_port_min, self.settings.engine_port_max
        for port in [0] if not lo and not hi else range(lo, hi + 1):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # a running engine (or anything else) holds it
                    continue
                return sock.getsockname()[1]
        raise Unavailable(f"no free engine port in {lo}-{hi}", reason="NO_ENGINE_PORT")

    # ------------------------------------------------------------------ control plane

    async def deploy(self, *, model_version: str, engine: str, options: EngineOptions | None = None,
                     adapters: list[tuple[str, str]] | None = None, replicas: int = 0, served_model_name: str = "",
                     deployment_id: str = "") -> DeploymentView:
        options = options or EngineOptions()
        adapters = adapters or []
        self._validate(model_version, engine, options, adapters, deployment_id, served_model_name)
        if engine == "vllm":
            check_vllm_installed(self.settings.vllm_python)
        base = await _get_version(self.source, model_version)
        if base.is_adapter:
            raise InvalidArgument.for_field("deployment.model_version", f"{model_version} is an adapter; deploy its "
                                            "base model and pass the adapter in deployment.adapters")
        if not base.ready:
            raise FailedPrecondition(f"model version {model_version} is not READY", reason="VERSION_NOT_READY")
        if base.vision and engine == "vllm":
            check_vllm_serves_vision(self.settings.vllm_python, model_version)
        if base.task == EMBEDDING_TASK and adapters:
            raise InvalidArgument.for_field("deployment.adapters", f"{model_version} is an embedding model: it takes "
                                            "no LoRA adapters")
        adapter_records = []
        for i, (alias, version) in enumerate(adapters):
            info = await _get_version(self.source, version)
            if not info.is_adapter:
                raise InvalidArgument.for_field(f"deployment.adapters[{i}].model_version",
                                                f"{version} is not an adapter version")
            adapter_records.append(AdapterRecord(alias, version, info.artifact_prefix, _files_of(info.manifest)))
        async with self._lock:
            deployment_id = deployment_id or f"d-{uuid.uuid4().hex[:10]}"
            name = f"deployments/{deployment_id}"
            if name in self._runners or name in self._deleting:
                raise AlreadyExists(f"deployment {name} already exists", reason="DEPLOYMENT_EXISTS")
            record = DeploymentRecord(
                name=name, model_version=model_version, engine=engine, options=options, adapters=adapter_records,
                replicas=max(1, replicas), served_model_name=served_model_name,
                artifact_prefix=base.artifact_prefix, files=_files_of(base.manifest), task=base.task,
            )
            with self.db.session() as s:
                s.add(DeploymentRow(name=name, spec=record.spec_json(), create_time=record.create_time,
                                    update_time=record.update_time))
            try:
                for version in [model_version, *(a.model_version for a in adapter_records)]:
                    await self.source.set_deployment_marker(version, deployment=name, deployed=True)
            except DomainError:
                with self.db.session() as s:
                    s.delete(s.get(DeploymentRow, name))
                raise
            runner = self._launch(record)
        log.info("deployment_created", deployment=name, model_version=model_version, engine=engine,
                 adapters=[a.alias for a in adapter_records])
        return runner.view()

    def _validate(self, model_version: str, engine: str, options: EngineOptions, adapters: list[tuple[str, str]],
                  deployment_id: str, served_model_name: str) -> None:
        if not VERSION_RE.match(model_version):
            raise InvalidArgument.for_field("deployment.model_version",
                                            f"must be models/{{model}}/versions/{{version}}, got {model_version!r}")
        if engine not in ENGINE_KINDS:
            raise InvalidArgument.for_field("deployment.engine", f"must be one of {', '.join(ENGINE_KINDS)}")
        if deployment_id and not DEPLOYMENT_ID_RE.match(deployment_id):
            raise InvalidArgument.for_field("deployment_id", "lowercase letters, digits and hyphens, 1-63 "
                                            f"characters, not starting or ending with a hyphen; got {deployment_id!r}")
        if options.dtype not in DTYPES:
            raise InvalidArgument.for_field("deployment.options.dtype", f"must be one of {', '.join(DTYPES)}")
        for key in ("max_model_len", "max_num_seqs", "kv_cache_bytes", "tensor_parallel_size", "max_lora_rank",
                    "max_loras"):
            if getattr(options, key) < 0:
                raise InvalidArgument.for_field(f"deployment.options.{key}", "must not be negative")
        if options.tool_call_parser and options.tool_call_parser not in valid_parsers(engine):
            raise InvalidArgument.for_field(
                "deployment.options.tool_call_parser",
                f"unknown tool-call parser {options.tool_call_parser!r} for the {engine} engine; valid: "
                f"{', '.join(valid_parsers(engine))} (empty: chosen from the model's chat template)")
        if options.tensor_parallel_size > 1 and engine != "vllm":
            raise InvalidArgument.for_field("deployment.options.tensor_parallel_size",
                                            "only the vllm engine runs tensor-parallel")
        seen: set[str] = set()
        for i, (alias, version) in enumerate(adapters):
            self._check_alias(alias, f"deployment.adapters[{i}].alias", served_model_name)
            if alias in seen:
                raise InvalidArgument.for_field(f"deployment.adapters[{i}].alias", f"duplicate alias {alias!r}")
            seen.add(alias)
            if not VERSION_RE.match(version):
                raise InvalidArgument.for_field(f"deployment.adapters[{i}].model_version",
                                                f"must be models/{{model}}/versions/{{version}}, got {version!r}")
        if served_model_name and not ALIAS_RE.match(served_model_name):
            raise InvalidArgument.for_field("deployment.served_model_name",
                                            "letters, digits, '.', '_' and '-', at most 64 characters")

    @staticmethod
    def _check_alias(alias: str, field_name: str, served_model_name: str) -> None:
        if not ALIAS_RE.match(alias):
            raise InvalidArgument.for_field(field_name, f"letters, digits, '.', '_' and '-', at most 64 characters, "
                                                        f"got {alias!r}")
        if alias == served_model_name:
            raise InvalidArgument.for_field(field_name, "must differ from the served model name")

    def _runner(self, name: str, field_name: str = "name") -> _Runner:
        parse_name(name, field_name)
        runner = self._runners.get(name)
        if runner is None:
            raise NotFound(f"deployment {name} not found", reason="DEPLOYMENT_NOT_FOUND", metadata={"name": name})
        return runner

    async def get(self, name: str) -> DeploymentView:
        return self._runner(name).view()

    async def list(self, *, page_size: int = 0, page_token: str = "", filter: str = "",
                   order_by: str = "") -> listing.Page[DeploymentView]:
        """One page of the deployments (they live in this process, with their live state: listed in memory)."""
        query = listing.parse(LIST_SCHEMA, filter=filter, order_by=order_by, page_size=page_size,
                              page_token=page_token)
        return listing.memory_page([r.view() for r in self._runners.values()], query, LIST_SCHEMA)

    async def undeploy(self, name: str) -> DeploymentView:
        runner = self._runner(name)
        async with self._lock:
            self._runners.pop(name, None)
            self._deleting.add(name)
        try:
            runner.set_state(State.DELETING)
            view = runner.view()
            await runner.stop()
            with self.db.session() as s:
                row = s.get(DeploymentRow, name)
                if row is not None:
                    s.delete(row)
            for version in [runner.record.model_version, *(a.model_version for a in runner.record.adapters)]:
                try:
                    await self.source.set_deployment_marker(version, deployment=name, deployed=False)
                except DomainError as err:
                    log.warning("deployment_marker_not_removed", deployment=name, version=version,
                                error=err.message)
        finally:
            self._deleting.discard(name)
            self.changed()
        log.info("deployment_deleted", deployment=name)
        return view

    async def load_adapter(self, name: str, alias: str, model_version: str) -> DeploymentView:
        runner = self._runner(name)
        self._check_alias(alias, "adapter.alias", runner.record.model_name)
        if not VERSION_RE.match(model_version):
            raise InvalidArgument.for_field("adapter.model_version",
                                            f"must be models/{{model}}/versions/{{version}}, got {model_version!r}")
        if runner.record.task == EMBEDDING_TASK:
            raise InvalidArgument.for_field("name", f"{name} serves an embedding model: it takes no LoRA adapters")
        async with runner.lock:
            # Read under the lock: two LoadAdapters at once must each add to what the other saved, not to the
            # record both saw before (the second would drop the first adapter from the deployment).
            rec = runner.record
            if any(a.alias == alias for a in rec.adapters):
                raise AlreadyExists(f"deployment {name} already has an adapter {alias!r}", reason="ADAPTER_EXISTS")
            if rec.engine == "vllm" and not runner.lora_enabled:
                raise FailedPrecondition(f"deployment {name} was started without LoRA support; deploy it with an "
                                         "adapter or options.max_loras > 0", reason="LORA_NOT_ENABLED")
            engine = self._ready_engine(runner)
            info = await _get_version(self.source, model_version)
            if not info.is_adapter:
                raise InvalidArgument.for_field("adapter.model_version", f"{model_version} is not an adapter version")
            path = await asyncio.to_thread(self.cache.ensure, info.artifact_prefix, info.manifest)
            await engine.load_adapter(alias, path)
            adapter = AdapterRecord(alias, model_version, info.artifact_prefix, _files_of(info.manifest))
            self._save(replace(rec, adapters=[*rec.adapters, adapter], update_time=utcnow()), runner)
            await self.source.set_deployment_marker(model_version, deployment=name, deployed=True)
        log.info("adapter_added", deployment=name, alias=alias, model_version=model_version)
        return runner.view()

    async def unload_adapter(self, name: str, alias: str) -> DeploymentView:
        runner = self._runner(name)
        async with runner.lock:
            rec = runner.record
            adapter = next((a for a in rec.adapters if a.alias == alias), None)
            if adapter is None:
                raise NotFound(f"deployment {name} has no adapter {alias!r}", reason="ADAPTER_NOT_FOUND")
            engine = self._ready_engine(runner)
            await engine.unload_adapter(alias)
            self._save(replace(rec, adapters=[a for a in rec.adapters if a.alias != alias], update_time=utcnow()),
                       runner)
            if not any(a.model_version == adapter.model_version for a in runner.record.adapters):
                try:
                    await self.source.set_deployment_marker(adapter.model_version, deployment=name, deployed=False)
                except DomainError as err:
                    log.warning("deployment_marker_not_removed", deployment=name, version=adapter.model_version,
                                error=err.message)
        log.info("adapter_removed", deployment=name, alias=alias)
        return runner.view()

    def _save(self, record: DeploymentRecord, runner: _Runner) -> None:
        with self.db.session() as s:
            row = s.get(DeploymentRow, record.name)
            if row is None:  # undeployed meanwhile
                raise NotFound(f"deployment {record.name} not found", reason="DEPLOYMENT_NOT_FOUND",
                               metadata={"name": record.name})
            row.spec = record.spec_json()
            row.update_time = record.update_time
        runner.record = record

    def engine_pids(self, name: str) -> builtins.list[int]:  # ``list`` is the List method in this class
        """Process ids of the running engines of ``name`` (diagnostics and tests)."""
        engine = self._runner(name).engine
        return [engine.pid] if engine is not None and engine.pid else []

    # ------------------------------------------------------------------ data plane

    @staticmethod
    def _ready_engine(runner: _Runner) -> Engine:
        engine = runner.engine
        if engine is None or runner.state != State.READY:
            detail = f": {runner.error.message}" if runner.error else ""
            raise Unavailable(f"deployment {runner.record.name} is {runner.state.value}{detail}",
                              reason="DEPLOYMENT_NOT_READY", metadata={"state": runner.state.value})
        return engine

    def engine_for(self, deployment: str, adapter: str = "", *, generate: bool = False,
                   image_field: str | None = None) -> tuple[Engine, str]:
        """The engine serving ``deployment`` and the model name to ask it for (the adapter's alias or
        the base model's name). Unavailable while the deployment is not READY; ``generate`` (chat,
        completions, scores): InvalidArgument naming ``model`` when the deployment is an embedding model;
        ``image_field`` (the request's first image part): InvalidArgument naming it when the model is not a
        vision-language model."""
        runner = self._runner(deployment, "deployment")
        if generate and runner.record.task == EMBEDDING_TASK:
            raise InvalidArgument.for_field("model", f"{deployment} serves an embedding model "
                                                     f"({runner.record.model_version}): it serves embeddings only",
                                            reason="EMBEDDING_MODEL")
        if image_field is not None and runner.engine is not None and not runner.vision:
            raise InvalidArgument.for_field(image_field, f"{deployment} serves {runner.record.model_version}, a "
                                                         "text-only model: it takes no images",
                                            reason="MODEL_TAKES_NO_IMAGES")
        if adapter and not any(a.alias == adapter for a in runner.record.adapters):
            known = ", ".join(a.alias for a in runner.record.adapters) or "none"
            raise InvalidArgument.for_field("adapter", f"deployment {deployment} has no adapter {adapter!r} "
                                                       f"(adapters: {known})")
        return self._ready_engine(runner), adapter or runner.record.model_name


# ---------------------------------------------------------------------- listing

LIST_SCHEMA = listing.Schema(
    fields={
        "state": listing.Field(get=lambda v: v.state.value, parse=listing.enum_value("DEPLOYMENT_STATE_", upper=True,
                                                                                     choices=[s.value for s in State]),
                               ops=listing.EQUALITY),
        "engine": listing.Field(get=lambda v: v.record.engine, parse=listing.enum_value("ENGINE_", choices=ENGINE_KINDS),
                                ops=listing.EQUALITY),
        "model_version": listing.Field(get=lambda v: v.record.model_version, ops=listing.EQUALITY),
        "name": listing.Field(get=lambda v: v.record.name, sortable=True, ops=listing.EQUALITY),
        "create_time": listing.Field(get=lambda v: v.record.create_time, parse=listing.time_value, sortable=True),
        "update_time": listing.Field(get=lambda v: v.update_time, parse=listing.time_value, sortable=True),
    },
    default_order="create_time desc",
    name=listing.Field(get=lambda v: v.record.name),
)


__all__ = ["Deployments", "DeploymentRecord", "DeploymentView", "AdapterRecord", "State", "parse_name"]
