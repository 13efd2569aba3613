"""deploy/docker/healthcheck.py, the containers' health check, against a real gRPC health service and a real
HTTP server on loopback: 0 only for SERVING / 2xx, 1 with the reason otherwise."""

from __future__ import annotations

import http.server
import importlib.util
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


def _load():
    spec = importlib.util.spec_from_file_location("yard_healthcheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load()


@pytest.fixture
def grpc_health():
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_check_follows_the_serving_status(grpc_health, capsys):
    servicer, port = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 0
    assert healthcheck.main(["grpc", str(port)]) == 0  # a bare port is loopback
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}", "--service", "modelyard.nope.v1.NopeService"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_grpc_check_fails_fast_when_nothing_listens(capsys):
    assert healthcheck.main(["grpc", f"127.0.0.1:{_free_port()}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_script_runs_standalone_as_the_images_run_it(grpc_health):
    """As in a container: `python /opt/modelyard/healthcheck.py grpc HOST:PORT`, exit status only."""
    servicer, port = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "grpc", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr


def test_http_check_wants_a_2xx(capsys):
    statuses = {"/healthz": 200, "/readyz": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main(["http", f"{base}/healthz"]) == 0
        assert healthcheck.main(["http", f"{base}/readyz"]) == 1
        assert "HTTP 503" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["http", f"http://127.0.0.1:{_free_port()}/healthz", "--timeout", "1"]) == 1
