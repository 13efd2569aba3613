"""The local stack: ``yard up / down / status`` and the Python API behind them.

``start_stack`` prepares the data directory's secrets (``cli.stack_secrets``: the service token, the S3
credentials and with ``--tls`` a local CA and certificates), starts the local S3 server (nanio), then every
service as a child process with the env contract the service chassis reads (``YARD_<NAME>_GRPC__PORT``,
``..._S3__ENDPOINT``, ``..._AUTH__TOKEN_FILE``, ``..._TLS__*``, ``YARD_<NAME>_<OTHER>_ADDR`` ...), and waits
until each answers its health check.
``run_supervisor`` keeps a stack running until SIGINT/SIGTERM and records it in
``<data-dir>/stack.json`` so ``yard status`` and ``yard down`` find it from another shell;
``start_detached`` runs that supervisor in the background. The service table is injectable
(a list of ``ServiceSpec``), so tests run the launcher with their own tiny servers.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import grpc
import httpx
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from cli.output import OutputFormat, OutputOption, emit, make_console
from cli.s3server import S3Server, port_in_use, start_s3_server
from cli.stack_secrets import StackSecrets, TlsFiles, prepare_stack_secrets, tls_files
from services.core.credentials import SecretsLayout
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.logging import get_logger
from services.core.settings import DEFAULT_DATA_DIR, DEFAULT_PORTS
from services.core.suppressed import record_suppressed

log = get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRPC_SERVICES = ("registry", "training", "quantization", "evaluation", "inference", "pipeline")
GATEWAY = "gateway"
S3 = "s3"
STATE_FILE = "stack.json"
SUPERVISOR_LOG = "supervisor.log"

Port = Annotated[int, Field(ge=1, le=65535)]


class HealthKind(enum.StrEnum):
    GRPC = "grpc"  # grpc.health.v1 Health/Check(service="") == SERVING
    HTTP = "http"  # GET /healthz == 200
    S3 = "s3"  # any HTTP answer


class Health(enum.StrEnum):
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DOWN = "DOWN"


class StackError(FailedPrecondition):
    """The stack could not start, or its state is not what the command needs."""

    default_reason = "STACK_FAILED"


class StackSettings(BaseSettings):
    """Settings of the local stack (env prefix ``YARD_STACK_``, e.g. ``YARD_STACK_PORT_REGISTRY``)."""

    model_config = SettingsConfigDict(env_prefix="YARD_STACK_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    only: list[str] = Field(default_factory=list)  # services to start; empty = all (S3 always starts)
    port_gateway: Port = DEFAULT_PORTS["gateway"]
    port_registry: Port = DEFAULT_PORTS["registry"]
    port_training: Port = DEFAULT_PORTS["training"]
    port_quantization: Port = DEFAULT_PORTS["quantization"]
    port_evaluation: Port = DEFAULT_PORTS["evaluation"]
    port_inference: Port = DEFAULT_PORTS["inference"]
    port_pipeline: Port = DEFAULT_PORTS["pipeline"]
    port_s3: Port = DEFAULT_PORTS["s3"]
    # Credentials of the local S3 server; empty: generated once per data dir (<data_dir>/secrets/s3.env).
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    # gRPC over TLS with client certificates (mTLS) from a local CA in <data_dir>/secrets/tls.
    # None: as the last start of this data dir (TLS while those files exist); false removes them.
    tls: bool | None = None
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def port(self, name: str) -> int:
        return getattr(self, f"port_{name}")

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def to_env(self) -> dict[str, str]:
        """These settings as ``YARD_STACK_*`` variables (how the detached supervisor receives them)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = json.dumps(value)
            env[f"YARD_STACK_{name.upper()}"] = str(value)
        return env


class ServiceSpec(BaseModel):
    """One child process of the stack: how to start it and how to ask whether it is healthy."""

    name: str
    argv: list[str]
    port: Port
    health: HealthKind = HealthKind.GRPC


class ServiceState(BaseModel):
    name: str
    address: str
    pid: int
    start_time: int | None = None  # guards against a recycled pid (see process_start_time)
    health: HealthKind
    log: str

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)


class StackState(BaseModel):
    """Contents of ``<data-dir>/stack.json``."""

    state: Literal["starting", "running", "failed"]
    supervisor_pid: int
    supervisor_start_time: int | None = None
    data_dir: str
    error: str = ""
    tls: bool = False  # the gRPC services speak TLS (mTLS) with the certificates in <data_dir>/secrets/tls
    services: list[ServiceState] = Field(default_factory=list)

    def supervisor_alive(self) -> bool:
        return pid_alive(self.supervisor_pid, self.supervisor_start_time)


def default_services(settings: StackSettings) -> list[ServiceSpec]:
    """The services of this checkout that exist (``services/<name>/__main__.py``, ``gateway/__main__.py``)."""
    specs = [
        ServiceSpec(name=name, argv=[sys.executable, "-m", f"services.{name}"], port=settings.port(name))
        for name in GRPC_SERVICES
        if (PROJECT_ROOT / "services" / name / "__main__.py").is_file()
    ]
    if (PROJECT_ROOT / GATEWAY / "__main__.py").is_file():
        specs.append(
            ServiceSpec(name=GATEWAY, argv=[sys.executable, "-m", GATEWAY], port=settings.port(GATEWAY), health=HealthKind.HTTP)
        )
    return specs


def select_services(specs: list[ServiceSpec], only: list[str]) -> list[ServiceSpec]:
    """The specs named in ``only`` (all when empty); S3 is always part of the stack."""
    if not only:
        return list(specs)
    wanted = [name for name in only if name != S3]
    names = [spec.name for spec in specs]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise InvalidArgument.for_field(
            "only", f"no such service: {', '.join(missing)} (available here: {', '.join(names) or 'none'})"
        )
    return [spec for spec in specs if spec.name in wanted]


def check_ports(settings: StackSettings, specs: list[ServiceSpec]) -> None:
    """Fail, naming the service and port, when a port is taken or given to two services."""
    owners: dict[int, str] = {}
    for name, port in [(S3, settings.port_s3)] + [(spec.name, spec.port) for spec in specs]:
        if port in owners:
            raise StackError(f"port {port} is given to both {owners[port]} and {name}")
        owners[port] = name
        if port_in_use(settings.host, port):
            raise StackError(
                f"port {port} for {name} is already in use on {settings.host}; stop what holds it or choose "
                f"another port (--port-{name} or YARD_STACK_PORT_{name.upper()})"
            )


def service_env(
    spec: ServiceSpec, specs: list[ServiceSpec], settings: StackSettings, secrets: StackSecrets
) -> dict[str, str]:
    """The environment of one child: the ``YARD_<NAME>_...`` contract on top of this process's env.

    A gRPC service gets the token file (``AUTH__TOKEN_FILE``) and, with TLS, its certificate, key and the CA
    with mTLS on (``TLS__*``); the gateway gets them for its calls (``SERVICE_AUTH__*``, ``SERVICE_TLS__*``).
    """
    prefix = f"YARD_{spec.name.upper()}_"
    listener = "HTTP" if spec.health is HealthKind.HTTP else "GRPC"
    auth, tls = ("SERVICE_AUTH__", "SERVICE_TLS__") if spec.name == GATEWAY else ("AUTH__", "TLS__")
    env = {k: v for k, v in os.environ.items() if not k.startswith((f"{prefix}{auth}", f"{prefix}{tls}"))}
    env.update(
        {
            f"{prefix}{listener}__HOST": settings.host,
            f"{prefix}{listener}__PORT": str(spec.port),
            f"{prefix}DATA_DIR": str(settings.data_dir / spec.name),
            f"{prefix}S3__ENDPOINT": f"{settings.host}:{settings.port_s3}",
            f"{prefix}S3__ACCESS_KEY": secrets.s3_access_key,
            f"{prefix}S3__SECRET_KEY": secrets.s3_secret_key,
            f"{prefix}{auth}TOKEN_FILE": str(secrets.token_file),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if secrets.tls is not None:
        files = secrets.tls
        env[f"{prefix}{tls}CA_FILE"] = str(files.ca_cert)
        if spec.name == GATEWAY:
            env[f"{prefix}{tls}CERT_FILE"] = str(files.client_cert)
            env[f"{prefix}{tls}KEY_FILE"] = str(files.client_key)
        else:
            env[f"{prefix}{tls}CERT_FILE"] = str(files.server_cert)
            env[f"{prefix}{tls}KEY_FILE"] = str(files.server_key)
            env[f"{prefix}{tls}CLIENT_AUTH"] = "true"
    for other in specs:
        if other.name != spec.name and other.health is HealthKind.GRPC:
            env[f"{prefix}{other.name.upper()}_ADDR"] = f"{settings.host}:{other.port}"
    return env


def _grpc_channel(target: str, tls: TlsFiles | None) -> grpc.Channel:
    options = [("grpc.enable_http_proxy", 0)]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert.read_bytes(),
        private_key=tls.client_key.read_bytes(),
        certificate_chain=tls.client_cert.read_bytes(),
    )
    return grpc.secure_channel(target, credentials, options=options)


def probe(kind: HealthKind, host: str, port: int, timeout: float = 1.0, tls: TlsFiles | None = None) -> Health:
    """Ask one endpoint whether it is healthy (a gRPC one over TLS with ``tls``'s client certificate)."""
    if kind is HealthKind.GRPC:
        with _grpc_channel(f"{host}:{port}", tls) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.RpcError as exc:
                down = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                return Health.DOWN if down else Health.NOT_SERVING
        return Health.SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else Health.NOT_SERVING
    path = "/healthz" if kind is HealthKind.HTTP else "/"
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            response = client.get(f"http://{host}:{port}{path}")
    except httpx.HTTPError:
        return Health.DOWN
    return Health.SERVING if kind is HealthKind.S3 or response.status_code == 200 else Health.NOT_SERVING


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen
    log: Path


@dataclass
class Stack:
    """A started stack. ``stop()`` stops the services in reverse start order, S3 last."""

    settings: StackSettings
    s3: S3Server
    secrets: StackSecrets
    services: list[RunningService] = field(default_factory=list)

    def states(self) -> list[ServiceState]:
        host = self.settings.host
        s3 = ServiceState(
            name=S3, address=self.s3.endpoint, pid=self.s3.process.pid, start_time=process_start_time(self.s3.process.pid),
            health=HealthKind.S3, log=str(self.settings.log_dir / f"{S3}.log"),
        )
        return [s3] + [
            ServiceState(
                name=s.spec.name, address=f"{host}:{s.spec.port}", pid=s.process.pid,
                start_time=process_start_time(s.process.pid), health=s.spec.health, log=str(s.log),
            )
            for s in self.services
        ]

    def stop(self) -> None:
        """Stop every child; one that cannot be stopped is logged and counted, and the others still are."""
        children = [(s.spec.name, s.process) for s in reversed(self.services)]
        if self.s3.process is not None:
            children.append((S3, self.s3.process))
        for name, process in children:
            try:
                _terminate(process, self.settings.stop_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the next children must still be stopped
                record_suppressed(log, "stack_stop_child", exc, level="error", child=name, pid=process.pid)
                continue
            log.info("service_stopped", child=name, code=process.returncode)


def start_stack(settings: StackSettings, services: list[ServiceSpec] | None = None) -> Stack:
    """Start S3 and the services, and return once every one is healthy.

    On any failure everything already started is stopped and a ``StackError`` names the service
    (and its log file).
    """
    specs = select_services(default_services(settings) if services is None else services, settings.only)
    check_ports(settings, specs)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    secrets = prepare_stack_secrets(
        settings.data_dir, host=settings.host, tls=settings.tls, s3_access_key=settings.s3_access_key,
        s3_secret_key=settings.s3_secret_key.get_secret_value(),
    )
    s3_log = _fresh_log(settings, S3)
    try:
        s3 = start_s3_server(
            settings.data_dir / S3, host=settings.host, port=settings.port_s3, access_key=secrets.s3_access_key,
            secret_key=secrets.s3_secret_key, log_file=s3_log, timeout=settings.startup_timeout_s,
        )
    except RuntimeError as exc:
        raise StackError(f"s3 failed to start: {exc}; see its log {s3_log}{_tail(s3_log)}") from exc
    stack = Stack(settings, s3, secrets)
    try:
        for spec in specs:
            stack.services.append(_spawn(spec, specs, settings, secrets))
            log.info("service_spawned", child=spec.name, pid=stack.services[-1].process.pid, port=spec.port)
        deadline = time.monotonic() + settings.startup_timeout_s
        for service in stack.services:
            _wait_healthy(service, settings, deadline, secrets.tls)
    except BaseException:
        stack.stop()
        raise
    log.info("stack_started", children=[s.spec.name for s in stack.services], data_dir=str(settings.data_dir))
    return stack


def _fresh_log(settings: StackSettings, name: str) -> Path:
    path = settings.log_dir / f"{name}.log"
    path.write_bytes(b"")
    return path


def _spawn(
    spec: ServiceSpec, specs: list[ServiceSpec], settings: StackSettings, secrets: StackSecrets
) -> RunningService:
    log_path = _fresh_log(settings, spec.name)
    (settings.data_dir / spec.name).mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            spec.argv, env=service_env(spec, specs, settings, secrets), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # own process group: signals come from us only
        )
    return RunningService(spec, process, log_path)


def _wait_healthy(service: RunningService, settings: StackSettings, deadline: float, tls: TlsFiles | None) -> None:
    name, port = service.spec.name, service.spec.port
    while True:
        code = service.process.poll()
        if code is not None:
            raise StackError(f"{name} exited with code {code} while starting; see its log {service.log}{_tail(service.log)}")
        health = probe(service.spec.health, settings.host, port, tls=tls)
        if health is Health.SERVING:
            log.info("service_healthy", child=name, port=port)
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} was not healthy on {settings.host}:{port} within {settings.startup_timeout_s:g}s "
                f"(health: {health.value}); see its log {service.log}{_tail(service.log)}"
            )
        time.sleep(0.2)


def _tail(path: Path, lines: int = 10) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n  | {line}" for line in text)


def _terminate(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; leftovers of its process group are killed too."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait()
    _kill_group(process.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already: nothing left to kill
        pass
    except PermissionError as exc:  # the pid (group) now belongs to someone else's process: not ours to kill
        record_suppressed(log, "stack_kill_group", exc, pgid=pgid)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (field 3), or None without it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), to tell it from a later one with its pid."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if the process exists, is not a zombie and (when given) started at ``start_time``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc/self/stat").exists()  # without procfs, trust kill(0)
    return stat[0] != "Z" and (start_time is None or int(stat[19]) == start_time)


# --- state file ------------------------------------------------------------------------------


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE


def read_state(data_dir: Path) -> StackState | None:
    """The recorded stack of ``data_dir``, or None when there is none."""
    try:
        return StackState.model_validate_json(state_path(data_dir).read_text())
    except (OSError, ValidationError):
        return None


def _write_state(data_dir: Path, state: StackState) -> None:
    path = state_path(data_dir)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    os.replace(tmp, path)


def running_state(data_dir: Path) -> StackState | None:
    """The recorded stack if its supervisor or any of its processes still runs."""
    state = read_state(data_dir)
    if state is None:
        return None
    if state.supervisor_alive() or any(s.alive() for s in state.services):
        return state
    return None


def _ensure_not_running(settings: StackSettings) -> None:
    state = running_state(settings.data_dir)
    if state is not None:
        raise StackError(
            f"a stack is already running for {settings.data_dir} (supervisor pid {state.supervisor_pid}); run `yard down` first"
        )


# --- supervisor, detached mode, down, status -----------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_supervisor(
    settings: StackSettings,
    services: list[ServiceSpec] | None = None,
    *,
    on_ready: Callable[[Stack], None] | None = None,
    keep_failed_state: bool = False,
) -> None:
    """Start the stack and keep it until SIGINT/SIGTERM, then stop it. Records it in the state file.

    With ``keep_failed_state`` a start failure stays in the state file for the process that
    launched this supervisor in the background (``start_detached``) to read.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_not_running(settings)
    previous_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    me = {"supervisor_pid": os.getpid(), "supervisor_start_time": process_start_time(os.getpid()), "data_dir": str(settings.data_dir)}
    _write_state(settings.data_dir, StackState(state="starting", **me))
    try:
        try:
            stack = start_stack(settings, services)
        except BaseException as exc:
            if keep_failed_state:
                error = exc.message if isinstance(exc, StackError | InvalidArgument) else f"{type(exc).__name__}: {exc}"
                _write_state(settings.data_dir, StackState(state="failed", error=error, **me))
            else:
                state_path(settings.data_dir).unlink(missing_ok=True)
            raise
        try:
            _write_state(
                settings.data_dir,
                StackState(state="running", services=stack.states(), tls=stack.secrets.tls is not None, **me),
            )
            if on_ready is not None:
                on_ready(stack)
            _watch(stack)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log.info("stack_stopping")
            stack.stop()
            state_path(settings.data_dir).unlink(missing_ok=True)
            log.info("stack_stopped")
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _watch(stack: Stack) -> None:
    """Wait for a signal; report children that exit on their own (they are not restarted)."""
    exited: set[str] = set()
    while True:
        time.sleep(0.5)
        for service in stack.services:
            code = service.process.poll()
            if code is not None and service.spec.name not in exited:
                exited.add(service.spec.name)
                log.error("service_exited", child=service.spec.name, code=code, log=str(service.log))


def start_detached(settings: StackSettings, services: list[ServiceSpec] | None = None) -> StackState:
    """Run the supervisor in the background (own session) and return once the stack is healthy."""
    _ensure_not_running(settings)
    specs = select_services(default_services(settings) if services is None else services, settings.only)
    check_ports(settings, specs)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    state_path(settings.data_dir).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "cli.stack"]
    if services is not None:
        argv.append(json.dumps([spec.model_dump(mode="json") for spec in services]))
    supervisor_log = settings.log_dir / SUPERVISOR_LOG
    with open(supervisor_log, "wb") as out:
        process = subprocess.Popen(
            argv, env=dict(os.environ, **settings.to_env()), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + settings.startup_timeout_s + 30
    while True:
        state = read_state(settings.data_dir)
        if state is not None and state.supervisor_pid == process.pid:
            if state.state == "running":
                return state
            if state.state == "failed":  # the supervisor already stopped what it started
                try:
                    process.wait(settings.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    _terminate(process, settings.stop_timeout_s)
                state_path(settings.data_dir).unlink(missing_ok=True)
                raise StackError(state.error)
        code = process.poll()
        if code is not None:
            raise StackError(f"the stack supervisor exited with code {code}; see {supervisor_log}{_tail(supervisor_log)}")
        if time.monotonic() > deadline:
            _terminate(process, settings.stop_timeout_s)
            raise StackError(f"the stack did not start in time; see {supervisor_log}{_tail(supervisor_log)}")
        time.sleep(0.2)


def stop_detached(data_dir: Path, timeout: float = 60.0) -> bool:
    """Stop the stack recorded in ``data_dir`` (detached or foreground). False if none was running."""
    state = running_state(data_dir)
    if state is None:
        state_path(data_dir).unlink(missing_ok=True)
        return False
    if state.supervisor_alive():
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while state.supervisor_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    for service in reversed(state.services):  # a supervisor that died or hung leaves these behind
        if service.alive():
            os.kill(service.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while service.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            _kill_group(service.pid)
    if state.supervisor_alive():
        _kill_group(state.supervisor_pid)
    state_path(data_dir).unlink(missing_ok=True)
    return True


def stack_status(data_dir: Path) -> list[tuple[ServiceState, Health, bool]] | None:
    """(service, health, pid alive) for each recorded service, or None when no stack is running."""
    state = running_state(data_dir)
    if state is None or state.state != "running":
        return None
    rows = []
    tls = tls_files(SecretsLayout(Path(data_dir))) if state.tls else None
    for service in state.services:
        host, _, port = service.address.rpartition(":")
        alive = service.alive()
        rows.append((service, probe(service.health, host, int(port), tls=tls) if alive else Health.DOWN, alive))
    return rows


def _supervisor_main(argv: list[str]) -> int:
    """Entry of the detached supervisor: settings from ``YARD_STACK_*``, optional service table as JSON."""
    from services.core.logging import configure_logging

    configure_logging(json=True, service="stack")
    services = [ServiceSpec.model_validate(item) for item in json.loads(argv[0])] if argv else None
    try:
        run_supervisor(StackSettings(), services, keep_failed_state=True)
    except (StackError, InvalidArgument):
        return 1
    except KeyboardInterrupt:  # stopped by `yard down` while starting
        return 130
    return 0


# --- CLI ---------------------------------------------------------------------------------------

stack_app = typer.Typer()
console = make_console()
err_console = make_console(stderr=True)

DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Stack data directory (default ~/.modelyard).")]


def _port_option(name: str):
    return typer.Option(f"--port-{name}", help=f"Port of {name} (default {DEFAULT_PORTS[name]}).", show_default=False)


def _settings(**overrides: object) -> StackSettings:
    try:
        return StackSettings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        err_console.print(f"[red]error:[/] invalid stack settings: {exc}")
        raise typer.Exit(1) from exc


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/] {getattr(exc, 'message', exc)}", highlight=False)
    return typer.Exit(1)


def _services_table(states: list[ServiceState], health: dict[str, tuple[Health, bool]] | None = None) -> Table:
    table = Table("name", "address", "pid", "health")
    colours = {Health.SERVING: "green", Health.NOT_SERVING: "yellow", Health.DOWN: "red"}
    for state in states:
        h, alive = (health or {}).get(state.name, (Health.SERVING, True))
        pid = str(state.pid) if alive else f"{state.pid} (gone)"
        table.add_row(state.name, state.address, pid, f"[{colours[h]}]{h.value}[/]")
    return table


def _print_credentials(settings: StackSettings, tls: bool) -> None:
    layout = SecretsLayout(settings.data_dir)
    what = f"token {layout.token_file}" + (f", mTLS certificates in {layout.tls_dir}" if tls else "")
    console.print(f"Service credentials: {what}.", highlight=False)
    if settings.data_dir != DEFAULT_DATA_DIR.expanduser().resolve():
        console.print(f"For yard and the SDK: export YARD_DATA_DIR={settings.data_dir}", highlight=False)


@stack_app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background; return once healthy.")] = False,
    data_dir: DataDirOption = None,
    only: Annotated[str | None, typer.Option("--only", help="Comma-separated services to start (S3 always starts).")] = None,
    port_gateway: Annotated[int | None, _port_option("gateway")] = None,
    port_registry: Annotated[int | None, _port_option("registry")] = None,
    port_training: Annotated[int | None, _port_option("training")] = None,
    port_quantization: Annotated[int | None, _port_option("quantization")] = None,
    port_evaluation: Annotated[int | None, _port_option("evaluation")] = None,
    port_inference: Annotated[int | None, _port_option("inference")] = None,
    port_pipeline: Annotated[int | None, _port_option("pipeline")] = None,
    port_s3: Annotated[int | None, _port_option("s3")] = None,
    tls: Annotated[bool | None, typer.Option(
        "--tls/--no-tls", show_default=False,
        help="gRPC over mutual TLS with a local CA made in <data-dir>/secrets/tls (kept for later starts; "
             "--no-tls removes it). Default: as the last start of this data dir.")] = None,
) -> None:
    """Start the local stack: the S3 server and every service, each in its own process.

    Every service requires the bearer token of <data-dir>/secrets/service_token (made once, mode 0600);
    the CLI and the SDK read it from there (set YARD_DATA_DIR for a data dir other than ~/.modelyard).
    """
    settings = _settings(
        data_dir=data_dir, only=[name.strip() for name in only.split(",") if name.strip()] if only else None,
        port_gateway=port_gateway, port_registry=port_registry, port_training=port_training,
        port_quantization=port_quantization, port_evaluation=port_evaluation, port_inference=port_inference,
        port_pipeline=port_pipeline, port_s3=port_s3, tls=tls,
    )
    try:
        if detach:
            state = start_detached(settings)
            console.print(_services_table(state.services))
            _print_credentials(settings, state.tls)
            console.print(f"Stack running in the background (logs in {settings.log_dir}); stop it with `yard down`.")
            return

        def ready(stack: Stack) -> None:
            console.print(_services_table(stack.states()))
            _print_credentials(settings, stack.secrets.tls is not None)
            console.print(f"Stack running (logs in {settings.log_dir}); press Ctrl-C to stop.")

        run_supervisor(settings, on_ready=ready)
        console.print("Stack stopped.")
    except (StackError, InvalidArgument) as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        err_console.print("Interrupted while starting; everything started was stopped.")
        raise typer.Exit(130) from None


@stack_app.command()
def down(data_dir: DataDirOption = None) -> None:
    """Stop the stack started with `yard up` (services first, S3 last)."""
    settings = _settings(data_dir=data_dir)
    if stop_detached(settings.data_dir, timeout=settings.stop_timeout_s * 7):
        console.print(f"Stack in {settings.data_dir} stopped.")
    else:
        console.print(f"No stack is running in {settings.data_dir}.")


@stack_app.command()
def status(data_dir: DataDirOption = None, output: OutputOption = OutputFormat.table) -> None:
    """Show each service of the stack with its health; exit 1 if any is not SERVING.

    json/yaml: one object per service (name, address, pid, alive, health, log).
    """
    settings = _settings(data_dir=data_dir)
    rows = stack_status(settings.data_dir)
    if rows is None:
        state = running_state(settings.data_dir)
        what = "still starting" if state is not None and state.state == "starting" else "not running"
        console.print(f"The stack in {settings.data_dir} is {what}.")
        raise typer.Exit(1)
    services = [{"name": s.name, "address": s.address, "pid": s.pid, "alive": alive, "health": h.value,
                 "log": s.log} for s, h, alive in rows]
    emit(services, output, lambda: _services_table([row[0] for row in rows],
                                                   {s.name: (h, alive) for s, h, alive in rows}), console=console)
    if any(health is not Health.SERVING for _, health, _ in rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    sys.exit(_supervisor_main(sys.argv[1:]))
