"""The local stack launcher with real processes: the real S3 server (nanio), tiny real gRPC
servers that serve grpc.health.v1 on the port the launcher gives them, and the real `yard` CLI.
Every test uses free ports, never the default ones."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli.s3server import port_in_use
from cli.stack import (
    Health,
    HealthKind,
    ServiceSpec,
    StackError,
    StackSettings,
    default_services,
    pid_alive,
    probe,
    read_state,
    start_detached,
    start_stack,
    state_path,
)
from services.core.errors import InvalidArgument
from tests.support.ports import free_ports

HOST = "127.0.0.1"

# A stand-in for a service: serves gRPC health on YARD_<NAME>_GRPC__PORT, records the env it got
# in its data dir and, on SIGTERM, appends its name to a file shared by the test's services.
SERVER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    name, mode, stops = sys.argv[1], sys.argv[2], sys.argv[3]
    prefix = f"YARD_{name.upper()}_"
    if mode == "exit":
        print(f"{name}: cannot open the database", flush=True)
        sys.exit(3)
    data_dir = os.environ[prefix + "DATA_DIR"]
    with open(os.path.join(data_dir, "env.json"), "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith(prefix)}, f)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    status = health_pb2.HealthCheckResponse.SERVING if mode == "serve" else health_pb2.HealthCheckResponse.NOT_SERVING
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"{os.environ[prefix + 'GRPC__HOST']}:{os.environ[prefix + 'GRPC__PORT']}")
    server.start()

    def on_term(signum, frame):
        with open(stops, "a") as f:
            f.write(name + "\\n")
        server.stop(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    server.wait_for_termination()
    """
)



class Fleet:
    """Builds ServiceSpecs running the stand-in server, and settings on free ports."""

    def __init__(self, tmp_path: Path):
        self.script = tmp_path / "tiny_service.py"
        self.script.write_text(SERVER)
        self.stops = tmp_path / "stops.txt"
        self.data_dir = tmp_path / "yard"

    def spec(self, name: str, port: int, mode: str = "serve") -> ServiceSpec:
        return ServiceSpec(name=name, argv=[sys.executable, str(self.script), name, mode, str(self.stops)], port=port)

    def settings(self, **kw) -> StackSettings:
        names = ("gateway", "registry", "training", "quantization", "evaluation", "inference", "pipeline", "s3")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        kw = {"data_dir": self.data_dir, "startup_timeout_s": 30.0, "stop_timeout_s": 5.0,
              **{f"port_{k}": v for k, v in ports.items()}, **kw}
        return StackSettings(**kw)


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


def yard(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_started_services_are_healthy_get_the_env_contract_and_stop_in_reverse_order(fleet):
    settings = fleet.settings()
    reg_port, train_port = free_ports(2)
    stack = start_stack(settings, [fleet.spec("registry", reg_port), fleet.spec("training", train_port)])
    try:
        assert probe(HealthKind.GRPC, HOST, reg_port) is Health.SERVING
        assert probe(HealthKind.GRPC, HOST, train_port) is Health.SERVING
        assert probe(HealthKind.S3, HOST, settings.port_s3) is Health.SERVING
        env = json.loads((fleet.data_dir / "training" / "env.json").read_text())
        assert env["YARD_TRAINING_GRPC__PORT"] == str(train_port)
        assert env["YARD_TRAINING_GRPC__HOST"] == HOST
        assert env["YARD_TRAINING_REGISTRY_ADDR"] == f"{HOST}:{reg_port}"
        assert env["YARD_TRAINING_DATA_DIR"] == str(fleet.data_dir / "training")
        assert env["YARD_TRAINING_S3__ENDPOINT"] == f"{HOST}:{settings.port_s3}"
        # the S3 credentials and the service token generated for this data dir (kept in <data_dir>/secrets)
        assert env["YARD_TRAINING_S3__ACCESS_KEY"] == stack.secrets.s3_access_key == stack.s3.access_key
        assert env["YARD_TRAINING_S3__SECRET_KEY"] == stack.secrets.s3_secret_key != "modelyard-secret"
        assert env["YARD_TRAINING_AUTH__TOKEN_FILE"] == str(fleet.data_dir / "secrets" / "service_token")
        assert "YARD_TRAINING_TRAINING_ADDR" not in env
        registry_env = json.loads((fleet.data_dir / "registry" / "env.json").read_text())
        assert registry_env["YARD_REGISTRY_TRAINING_ADDR"] == f"{HOST}:{train_port}"
        assert sorted(p.name for p in (fleet.data_dir / "logs").iterdir()) == ["registry.log", "s3.log", "training.log"]
        pids = [s.pid for s in stack.states()]
    finally:
        stack.stop()
    assert fleet.stops.read_text().split() == ["training", "registry"]
    assert wait_gone(pids) == []
    assert probe(HealthKind.S3, HOST, settings.port_s3) is Health.DOWN


def test_detached_stack_shows_in_status_and_down_stops_every_process(fleet):
    settings = fleet.settings()
    reg_port, inf_port = free_ports(2)
    state = start_detached(settings, [fleet.spec("registry", reg_port), fleet.spec("inference", inf_port)])
    assert [s.name for s in state.services] == ["s3", "registry", "inference"]
    pids = [state.supervisor_pid] + [s.pid for s in state.services]
    try:
        result = yard("status", "--data-dir", str(fleet.data_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        for service in state.services:
            line = next(line for line in result.stdout.splitlines() if f" {service.name} " in line)
            assert "SERVING" in line and service.address in line and str(service.pid) in line
        as_json = yard("status", "--data-dir", str(fleet.data_dir), "-o", "json")
        assert as_json.returncode == 0, as_json.stderr
        assert [(s["name"], s["address"], s["pid"], s["health"]) for s in json.loads(as_json.stdout)] == [
            (s.name, s.address, s.pid, "SERVING") for s in state.services]

        with pytest.raises(StackError, match="already running"):
            start_detached(settings, [fleet.spec("registry", reg_port)])

        os.kill(state.services[2].pid, signal.SIGKILL)  # inference dies on its own
        assert wait_gone([state.services[2].pid]) == []
        result = yard("status", "--data-dir", str(fleet.data_dir))
        assert result.returncode == 1
        assert "DOWN" in next(line for line in result.stdout.splitlines() if " inference " in line)
    finally:
        result = yard("down", "--data-dir", str(fleet.data_dir))
    assert result.returncode == 0 and "stopped" in result.stdout
    assert wait_gone(pids) == []
    assert not state_path(fleet.data_dir).exists()
    assert fleet.stops.read_text().split() == ["registry"]  # inference was already dead

    result = yard("status", "--data-dir", str(fleet.data_dir))
    assert result.returncode == 1 and "not running" in result.stdout
    result = yard("down", "--data-dir", str(fleet.data_dir))
    assert result.returncode == 0 and "No stack is running" in result.stdout


def test_port_in_use_names_the_service_and_port_and_starts_nothing(fleet):
    settings = fleet.settings()
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StackError, match=rf"port {port} for training is already in use"):
            start_stack(settings, [fleet.spec("registry", free_ports(1)[0]), fleet.spec("training", port)])
        assert not port_in_use(HOST, settings.port_s3)  # S3 was never started

        with pytest.raises(StackError, match=rf"port {port} for training is already in use"):
            start_detached(settings, [fleet.spec("training", port)])
        assert read_state(fleet.data_dir) is None

        result = yard("up", "--detach", "--data-dir", str(fleet.data_dir), "--port-s3", str(port))
    assert result.returncode == 1
    assert f"port {port} for s3 is already in use" in result.stderr
    assert read_state(fleet.data_dir) is None


def test_child_that_exits_at_start_is_named_with_its_log_and_the_rest_is_stopped(fleet):
    settings = fleet.settings()
    reg_port, eval_port = free_ports(2)
    specs = [fleet.spec("registry", reg_port), fleet.spec("evaluation", eval_port, mode="exit")]
    log_file = fleet.data_dir / "logs" / "evaluation.log"
    with pytest.raises(StackError) as info:
        start_stack(settings, specs)
    message = info.value.message
    assert "evaluation exited with code 3" in message
    assert str(log_file) in message
    assert "cannot open the database" in message  # the tail of its log
    assert fleet.stops.read_text().split() == ["registry"]
    assert not port_in_use(HOST, settings.port_s3) and not port_in_use(HOST, reg_port)

    with pytest.raises(StackError, match=str(log_file)):
        start_detached(settings, specs)
    assert read_state(fleet.data_dir) is None
    assert not port_in_use(HOST, settings.port_s3)


def test_service_that_never_serves_times_out_naming_it(fleet):
    # Long enough for the stand-in to be up and answer NOT_SERVING on a busy machine (it never turns SERVING,
    # so the test always waits this long; a short window read DOWN when the interpreter started slowly).
    settings = fleet.settings(startup_timeout_s=10.0)
    port = free_ports(1)[0]
    unhealthy = r"quantization was not healthy .* \(health: NOT_SERVING\); see its log .*quantization\.log"
    with pytest.raises(StackError, match=unhealthy):
        start_stack(settings, [fleet.spec("quantization", port, mode="not-serving")])
    assert not port_in_use(HOST, port) and not port_in_use(HOST, settings.port_s3)


def test_only_selects_services_and_rejects_unknown_names(fleet):
    reg_port, train_port = free_ports(2)
    specs = [fleet.spec("registry", reg_port), fleet.spec("training", train_port)]
    with pytest.raises(InvalidArgument, match="only: no such service: nope") as info:
        start_stack(fleet.settings(only=["registry", "nope"]), specs)
    assert info.value.violations[0].field == "only"

    stack = start_stack(fleet.settings(only=["registry", "s3"]), specs)
    try:
        assert [s.name for s in stack.states()] == ["s3", "registry"]
        assert probe(HealthKind.GRPC, HOST, train_port) is Health.DOWN
    finally:
        stack.stop()


def stack_env(settings: StackSettings) -> dict[str, str]:
    return {k: v for k, v in settings.to_env().items() if k.startswith("YARD_STACK_PORT_")}


def test_cli_up_detach_status_down_with_this_checkouts_services(fleet):
    settings = fleet.settings()
    env = stack_env(settings)
    result = yard("up", "--detach", "--data-dir", str(fleet.data_dir), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    state = read_state(fleet.data_dir)
    assert state is not None and state.state == "running"
    assert [s.name for s in state.services] == ["s3"] + [s.name for s in default_services(settings)]
    assert state.services[0].address == f"{HOST}:{settings.port_s3}"
    pids = [state.supervisor_pid] + [s.pid for s in state.services]
    try:
        result = yard("status", "--data-dir", str(fleet.data_dir))
        assert result.returncode == 0 and "SERVING" in result.stdout
    finally:
        result = yard("down", "--data-dir", str(fleet.data_dir))
    assert result.returncode == 0
    assert wait_gone(pids) == []


def test_foreground_up_stops_everything_on_ctrl_c(fleet):
    settings = fleet.settings()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--data-dir", str(fleet.data_dir)],
        env={**os.environ, **stack_env(settings)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (state := read_state(fleet.data_dir)) is None or state.state != "running":
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "stack did not start"
            time.sleep(0.1)
        assert probe(HealthKind.S3, HOST, settings.port_s3) is Health.SERVING
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Stack stopped." in output
    assert wait_gone([s.pid for s in state.services]) == []
    assert not state_path(fleet.data_dir).exists()
