"""The whole local stack as a user starts it: ``yard up --detach`` on free ports with its own data
directory, every later step through the real ``yard`` CLI, and ``yard down`` at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cli.stack import read_state
from tests.support.ports import free_ports

HOST = "127.0.0.1"
PORTED = ("gateway", "registry", "training", "quantization", "evaluation", "inference", "pipeline", "s3")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"



@dataclass
class YardStack:
    """A running stack: where it listens, and the ``yard`` CLI pointed at it."""

    data_dir: Path
    ports: dict[str, int]
    cli_env: dict[str, str] = field(default_factory=dict)
    key: str = ""  # an API key of the gateway, once created

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.ports['gateway']}"

    @property
    def inference_addr(self) -> str:
        return f"{HOST}:{self.ports['inference']}"

    def yard(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``yard ARGS`` against this stack; with ``check``, fail with its output unless it exits 0."""
        result = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                                timeout=timeout, env=self.cli_env, cwd=PROJECT_ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"yard {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}\n{self.log_tails()}")
        return result

    def service_pid(self, name: str) -> int:
        state = read_state(self.data_dir)
        assert state is not None, "the stack is not running"
        return next(s.pid for s in state.services if s.name == name)

    def engine_pid(self, endpoint: str) -> int:
        """The engine process serving ``endpoint`` (http://127.0.0.1:PORT): the inference service's
        child whose command line carries ``--port PORT``."""
        port = endpoint.rsplit(":", 1)[1]
        for child in psutil.Process(self.service_pid("inference")).children():
            cmd = child.cmdline()
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
                return child.pid
        raise AssertionError(f"no engine process listens on {endpoint}")

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


@contextmanager
def yard_stack(data_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[YardStack]:
    """``yard up --detach`` on free ports (never the defaults), yield, then ``yard down``.

    ``extra_env`` reaches every service (e.g. ``YARD_INFERENCE_...`` settings)."""
    ports = dict(zip(PORTED, free_ports(len(PORTED)), strict=True))
    base = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "COLUMNS": "200"}
    up_env = {**base, **{f"YARD_STACK_PORT_{name.upper()}": str(port) for name, port in ports.items()},
              "YARD_INFERENCE_VLLM_PYTHON": str(VLLM_PYTHON), **(extra_env or {})}
    stack = YardStack(data_dir, ports, cli_env={
        **base,
        "YARD_DATA_DIR": str(data_dir),  # where the CLI finds the stack's service token
        "YARD_REGISTRY_ADDR": f"{HOST}:{ports['registry']}",
        "YARD_INFERENCE_ADDR": f"{HOST}:{ports['inference']}",
        "YARD_GATEWAY_URL": f"http://{HOST}:{ports['gateway']}",
        "YARD_GATEWAY_ADMIN_TOKEN_FILE": str(data_dir / "gateway" / "admin_token"),
    })
    started = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "cli.main", "up", "--detach", "--data-dir", str(data_dir)],
                        capture_output=True, text=True, timeout=300, env=up_env, cwd=PROJECT_ROOT)
    try:
        if up.returncode != 0:
            raise AssertionError(f"yard up failed:\n{up.stdout}\n{up.stderr}\n{stack.log_tails()}")
        print(f"stack up in {time.monotonic() - started:.1f}s: {ports}")
        yield stack
    finally:
        subprocess.run([sys.executable, "-m", "cli.main", "down", "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=300, env=base, cwd=PROJECT_ROOT)
