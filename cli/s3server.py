"""Start and stop the local S3 server (nanio, pinned) on loopback.

Used by the local stack (`yard up`) and by the test suite, so both run the same server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class S3Server:
    host: str
    port: int
    access_key: str
    secret_key: str
    data_dir: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def nanio_executable() -> str:
    exe = Path(sys.executable).with_name("nanio")
    if exe.exists():
        return str(exe)
    found = shutil.which("nanio")
    if not found:
        raise RuntimeError("nanio is not installed (pip install nanio==0.1.7)")
    return found


def wait_s3_ready(host: str, port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{host}:{port}/"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"S3 server exited with code {process.returncode} before it became ready")
        try:
            httpx.get(url, timeout=1.0)  # any HTTP answer (403 without a signature) means it is up
            return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"S3 server on {host}:{port} not ready after {timeout}s: {last}")


def start_s3_server(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    access_key: str | None = None,
    secret_key: str | None = None,
    log_file: Path | None = None,
    timeout: float = 30.0,
) -> S3Server:
    """Start nanio on ``host:port`` (0: a free port) with ``access_key`` / ``secret_key`` (None: random ones,
    read back from the returned ``S3Server``)."""
    access_key = access_key or f"yard-{secrets.token_hex(8)}"
    secret_key = secret_key or secrets.token_urlsafe(32)
    port = port or free_port(host)
    if port_in_use(host, port):
        raise RuntimeError(f"port {port} on {host} is already in use (S3 server)")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NANIO_ACCESS_KEY=access_key, NANIO_SECRET_KEY=secret_key)
    with open(log_file or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [nanio_executable(), "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir),
             "--log-level", "warning", "--no-access-log"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(host, port, access_key, secret_key, data_dir, proc)
    try:
        wait_s3_ready(host, port, timeout, proc)
    except Exception:
        server.stop()
        raise
    return server
