"""Routing of OpenAI model names to inference replicas.

Every replica's ``ListDeployments`` is read periodically; only READY deployments enter the
table. A request goes to the ready replica with the fewest outstanding requests. A replica that
fails with UNAVAILABLE (or cannot connect) is ejected for ``eject_s`` and checked again by the
next refresh after that; a replica whose listing fails serves nothing until it answers again.
Model names: a deployment's served name (or its id), and ``<name>:<adapter alias>``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.inference.v1 import inference_pb2_grpc as pb_grpc
from services.core.credentials import ClientCredentials
from services.core.errors import NotFound, Unavailable
from services.core.grpc_client import make_channel
from services.core.logging import get_logger

from .metrics import REPLICA_OUTSTANDING
from .settings import RoutingSettings, TimeoutSettings

log = get_logger("modelyard.gateway.routing")

ON_DEMAND_REFRESH_S = 0.5  # an unknown model name triggers at most one refresh this often
# UNAVAILABLE reasons the inference service gives when the replica answers but one deployment on it
# cannot serve (not READY, its engine died): only that deployment leaves the table, not the replica.
DEPLOYMENT_DOWN_REASONS = frozenset({"DEPLOYMENT_NOT_READY", "ENGINE_UNAVAILABLE"})


@dataclass(frozen=True)
class Target:
    """Where one model name lives on one replica."""

    model: str  # the public name
    deployment: str  # deployments/{id}
    adapter: str  # alias, or "" for the base model
    model_version: str
    created: int


@dataclass
class Replica:
    addr: str
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceServiceStub
    outstanding: int = 0
    ejected_until: float = 0.0
    listed: bool = False  # the last ListDeployments answered
    ready: dict[str, Target] = field(default_factory=dict)  # public name -> target (READY deployments)
    known: set[str] = field(default_factory=set)  # every name the replica has, ready or not
    last_error: str = ""
    ejections: int = 0  # bumped by every eject: a refresh in flight across one must not undo it
    # what a streaming call adds to its own metadata (the token on a plaintext channel; else empty)
    call_metadata: tuple[tuple[str, str], ...] = ()

    @property
    def ejected(self) -> bool:
        return self.ejected_until > time.monotonic()

    def acquire(self) -> None:
        self.outstanding += 1
        REPLICA_OUTSTANDING.labels(self.addr).set(self.outstanding)

    def release(self) -> None:
        self.outstanding -= 1
        REPLICA_OUTSTANDING.labels(self.addr).set(self.outstanding)


def public_names(dep: pb.Deployment) -> list[tuple[str, str]]:
    """(public name, adapter alias) pairs a deployment serves."""
    base = dep.served_model_name or dep.name.removeprefix("deployments/")
    return [(base, "")] + [(f"{base}:{a.alias}", a.alias) for a in dep.adapters]


class Router:
    def __init__(
        self,
        addrs: list[str],
        timeouts: TimeoutSettings,
        settings: RoutingSettings,
        credentials: ClientCredentials | None = None,
    ) -> None:
        if not addrs:
            raise ValueError("at least one inference address is needed")
        self._timeouts = timeouts
        self._settings = settings
        self.replicas: list[Replica] = []
        for addr in addrs:
            # the data path passes its own deadline and request id: streams skip the interceptor hop
            channel = make_channel(
                addr, default_timeout_s=None, retry_attempts=1, intercept_streams=False, credentials=credentials
            )
            self.replicas.append(
                Replica(
                    addr,
                    channel,
                    pb_grpc.InferenceServiceStub(channel),
                    call_metadata=credentials.call_metadata if credentials else (),
                )
            )
        self._task: asyncio.Task | None = None
        self._last_on_demand = 0.0
        self._refresh_lock = asyncio.Lock()
        self._rr = 0

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="routing-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for r in self.replicas:
            await r.channel.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("routing_refresh_failed")

    async def refresh(self) -> None:
        async with self._refresh_lock:
            await asyncio.gather(*(self._refresh_one(r) for r in self.replicas if not r.ejected))

    async def _draining(self, replica: Replica) -> bool:
        """The replica's gRPC health says NOT_SERVING (it is draining after SIGTERM): no new requests
        go there, though it still serves those in flight. A replica without a health service counts as serving."""
        try:
            reply = await health_pb2_grpc.HealthStub(replica.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeouts.unary_s
            )
        except grpc.aio.AioRpcError:
            return False  # unreachable: ListDeployments tells
        return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    async def _refresh_one(self, replica: Replica) -> None:
        deployments: list[pb.Deployment] = []
        token = ""
        ejections = replica.ejections
        if await self._draining(replica):
            if replica.listed:
                log.warning("replica_draining", replica=replica.addr)
            replica.listed, replica.ready, replica.last_error = False, {}, "draining (health NOT_SERVING)"
            return
        try:
            while True:
                reply = await replica.stub.ListDeployments(
                    pb.ListDeploymentsRequest(page_size=100, page_token=token), timeout=self._timeouts.unary_s
                )
                deployments.extend(reply.deployments)
                token = reply.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            if replica.listed or not replica.last_error:
                log.warning("replica_unreachable", replica=replica.addr, code=exc.code().name, error=exc.details())
            replica.listed, replica.ready, replica.last_error = False, {}, f"{exc.code().name}: {exc.details()}"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                replica.ejected_until = time.monotonic() + self._settings.eject_s
            return
        ready: dict[str, Target] = {}
        known: set[str] = set()
        for dep in deployments:
            for name, alias in public_names(dep):
                known.add(name)
                if dep.state == pb.DEPLOYMENT_STATE_READY:
                    ready[name] = Target(name, dep.name, alias, dep.model_version, dep.create_time.seconds)
        if replica.ejections != ejections:
            return  # a request failed on it while this listing was in flight: the ejection stands
        if not replica.listed:
            log.info("replica_listed", replica=replica.addr, ready=sorted(ready))
        replica.listed, replica.ready, replica.known, replica.last_error = True, ready, known, ""
        replica.ejected_until = 0.0

    def eject(self, replica: Replica, error: str) -> None:
        """Stop routing to ``replica`` for eject_s; the next refresh after that checks it again."""
        replica.ejected_until = time.monotonic() + self._settings.eject_s
        replica.ejections += 1
        replica.ready, replica.listed, replica.last_error = {}, False, error
        log.warning("replica_ejected", replica=replica.addr, error=error, for_s=self._settings.eject_s)

    def unavailable(self, replica: Replica, target: Target, reason: str, error: str) -> None:
        """After UNAVAILABLE from ``replica`` for ``target``: a deployment-level failure drops that
        deployment's names from the replica's table until a refresh finds it READY again; any other
        failure ejects the whole replica."""
        if reason not in DEPLOYMENT_DOWN_REASONS:
            self.eject(replica, error)
            return
        replica.ready = {name: t for name, t in replica.ready.items() if t.deployment != target.deployment}
        log.warning(
            "deployment_unrouted", replica=replica.addr, deployment=target.deployment, reason=reason, error=error
        )

    def models(self) -> list[Target]:
        """Every model name some routable replica serves now, once each."""
        seen: dict[str, Target] = {}
        for r in self.replicas:
            if not r.ejected:
                for name, target in r.ready.items():
                    seen.setdefault(name, target)
        return sorted(seen.values(), key=lambda t: t.model)

    @property
    def ready(self) -> bool:
        return any(r.listed and not r.ejected for r in self.replicas)

    async def resolve(self, model: str) -> None:
        """NotFound (404) when no replica knows ``model`` (after one on-demand refresh)."""
        if any(model in r.known for r in self.replicas):
            return
        now = time.monotonic()
        if now - self._last_on_demand >= ON_DEMAND_REFRESH_S:
            self._last_on_demand = now
            await self.refresh()
            if any(model in r.known for r in self.replicas):
                return
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            reason="MODEL_NOT_FOUND",
            metadata={"model": model},
        )

    def pick(self, model: str, exclude: AbstractSet[str] = frozenset()) -> tuple[Replica, Target]:
        """The ready, non-ejected replica serving ``model`` with the fewest outstanding requests."""
        candidates = [r for r in self.replicas if model in r.ready and not r.ejected and r.addr not in exclude]
        if not candidates:
            errors = "; ".join(f"{r.addr}: {r.last_error}" for r in self.replicas if r.last_error)
            raise Unavailable(
                f"No ready replica serves model '{model}' right now"
                + (f" ({errors})" if errors else "")
                + ". Retry later.",
                reason="NO_READY_REPLICA",
                metadata={"model": model},
            )
        self._rr += 1
        low = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == low]
        replica = best[self._rr % len(best)]
        return replica, replica.ready[model]

    async def connect(self, replica: Replica) -> None:
        """Wait (at most connect_s) for the replica's channel; Unavailable if it does not come up."""
        if replica.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            async with asyncio.timeout(self._timeouts.connect_s):
                await replica.channel.channel_ready()
        except TimeoutError:
            raise Unavailable(
                f"inference replica {replica.addr} did not connect within {self._timeouts.connect_s}s",
                reason="REPLICA_UNREACHABLE",
            ) from None
