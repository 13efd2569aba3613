"""A serving stack of real processes, for the reliability tests (tests/reliability/) and bench/soak.py.

The registry, the inference service and the gateway each run as ``python -m ...`` the way ``yard up``
starts them (their settings through ``YARD_<SERVICE>_...`` variables), so that a test can SIGKILL or
SIGTERM any of them; the inference service starts the transformers engine as its own child process
(serving a tiny random model built here, or any model folder given). S3 is a nanio server given by
the caller (the tests' session server, or one that ``bench/soak.py`` starts).

Everything here is synchronous (threads, blocking gRPC stubs, httpx): a test drives its clients in its
own event loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.inference.v1 import inference_pb2_grpc as ipb_grpc
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.settings import S3Settings
from tests.support.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
INFERENCE_SERVICE = ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_TOKEN = "admin-serving-stack"  # noqa: S105 - a test stack's own token
SERVING = health_pb2.HealthCheckResponse.SERVING



def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    """One service process: how to start it, its log file, and its ``Popen`` while it runs."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive:
            return
        assert self.popen is not None
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name} ({self.log_path})\n" + "\n".join(text[-lines:])


@dataclass
class ServingStack:
    """Registry, inference service (with one deployment on the transformers engine) and gateway,
    each a process of its own; ``start`` brings them up and creates one API key."""

    work: Path
    s3: S3Settings
    model_dir: Path | None = None  # None: a tiny random model (cli.demo_models.build_tiny_model)
    deployment: str = "tiny"
    max_model_len: int = 0  # the deployment's context; 0: the model's
    max_num_seqs: int = 64
    inference_env: dict[str, str] = field(default_factory=dict)  # extra YARD_INFERENCE_* settings
    gateway_env: dict[str, str] = field(default_factory=dict)  # extra YARD_GATEWAY_* settings
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    key: str = ""  # the API key created by ``start``

    # ------------------------------------------------------------------ addresses

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.ports['gateway']}"

    @property
    def inference_addr(self) -> str:
        return f"{HOST}:{self.ports['inference']}"

    @property
    def registry_addr(self) -> str:
        return f"{HOST}:{self.ports['registry']}"

    @property
    def deployment_name(self) -> str:
        return f"deployments/{self.deployment}"

    # ------------------------------------------------------------------ processes

    def _base_env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"}

    def _s3_env(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}S3__ENDPOINT": self.s3.endpoint, f"{prefix}S3__ACCESS_KEY": self.s3.access_key,
                f"{prefix}S3__SECRET_KEY": self.s3.secret_key.get_secret_value(), f"{prefix}S3__BUCKET": self.s3.bucket}

    def _define(self) -> None:
        py = sys.executable
        logs = self.work / "logs"
        reg = "YARD_REGISTRY_"
        self.processes["registry"] = Process("registry", [py, "-m", "services.registry"], {
            **self._base_env(), **self._s3_env(reg), f"{reg}DATA_DIR": str(self.work / "registry"),
            f"{reg}GRPC__HOST": HOST, f"{reg}GRPC__PORT": str(self.ports["registry"]),
            f"{reg}IMPORT_WORKERS": "1", f"{reg}HF_ENDPOINT": "http://127.0.0.1:9",
        }, logs / "registry.log")
        inf = "YARD_INFERENCE_"
        self.processes["inference"] = Process("inference", [py, "-m", "services.inference"], {
            **self._base_env(), **self._s3_env(inf), f"{inf}DATA_DIR": str(self.work / "inference"),
            f"{inf}GRPC__HOST": HOST, f"{inf}GRPC__PORT": str(self.ports["inference"]),
            f"{inf}REGISTRY_ADDR": self.registry_addr, f"{inf}VLLM_PYTHON": str(self.work / "no-vllm" / "python"),
            f"{inf}RESTART_BACKOFF_INITIAL_S": "0.5", f"{inf}HEALTH_INTERVAL_S": "0.5",
            f"{inf}ENGINE_START_TIMEOUT_S": "300", f"{inf}OMP_THREADS": "1",
            f"{inf}TRANSFORMERS_MAX_NUM_SEQS": str(self.max_num_seqs),
            **self.inference_env,
        }, logs / "inference.log")
        gw = "YARD_GATEWAY_"
        self.processes["gateway"] = Process("gateway", [py, "-m", "gateway"], {
            **self._base_env(), f"{gw}DATA_DIR": str(self.work / "gateway"), f"{gw}HTTP__HOST": HOST,
            f"{gw}HTTP__PORT": str(self.ports["gateway"]), f"{gw}INFERENCE_ADDR": self.inference_addr,
            f"{gw}REGISTRY_ADDR": self.registry_addr, f"{gw}ADMIN_TOKEN": ADMIN_TOKEN,
            f"{gw}ROUTING__REFRESH_INTERVAL_S": "0.5", f"{gw}ROUTING__EJECT_S": "1",
            f"{gw}QUOTA__USAGE_FLUSH_S": "0.5", f"{gw}CONSOLE__ENABLED": "false",
            **self.gateway_env,
        }, logs / "gateway.log")

    def start(self, timeout: float = 300.0) -> ServingStack:
        """Every process up, the model registered and deployed (READY), one API key created."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(("registry", "inference", "gateway"), free_ports(3), strict=True))
        self._define()
        try:
            for name in ("registry", "inference", "gateway"):
                self.processes[name].start()
            model_dir = self.model_dir or self._build_tiny_model()
            prefix = f"uploads/{self.deployment}/{uuid.uuid4().hex[:8]}"
            S3ArtifactStore.connect(self.s3).upload_dir(prefix, model_dir)
            self.wait_grpc_serving("registry", timeout=60)
            version = self._register(prefix)
            self.wait_grpc_serving("inference", timeout=60)
            options = ipb.EngineOptions(max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs)
            self.inference_stub().Deploy(ipb.DeployRequest(
                deployment=ipb.Deployment(model_version=version, engine=ipb.ENGINE_TRANSFORMERS, options=options),
                deployment_id=self.deployment), timeout=60)
            self.wait_deployment_ready(timeout)
            self.wait_gateway_routes(timeout=60)
            self.key = self.create_key("serving-stack")["key"]
        except BaseException:
            print(self.log_tails())
            self.stop()
            raise
        return self

    def _build_tiny_model(self) -> Path:
        from cli.demo_models import build_tiny_model

        model_dir = build_tiny_model(self.work / "tiny-model")
        # a long context (rotary positions: nothing is sized by it) lets a request run as long as a test needs
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["max_position_embeddings"] = 1_000_000
        config_path.write_text(json.dumps(config))
        return model_dir

    def _register(self, prefix: str) -> str:
        with grpc.insecure_channel(self.registry_addr) as channel:
            version = rpb_grpc.RegistryServiceStub(channel).CreateModelVersion(rpb.CreateModelVersionRequest(
                parent=f"models/{self.deployment}", version_id="base",
                model_version=rpb.ModelVersion(artifact_prefix=prefix)), timeout=120)
        return version.name

    def stop(self) -> None:
        """Every process stopped (gateway first, then the inference service with its engine)."""
        for name in ("gateway", "inference", "registry"):
            proc = self.processes.get(name)
            if proc is not None:
                proc.stop()

    def restart(self, name: str, timeout: float = 300.0) -> None:
        """Start ``name`` again after it exited (the inference service recovers its deployment)."""
        proc = self.processes[name]
        if proc.alive:
            proc.stop()
        proc.start()
        if name == "gateway":
            self.wait_gateway_routes(timeout)
        else:
            self.wait_grpc_serving(name, timeout=60)
            if name == "inference":
                self.wait_deployment_ready(timeout)
                self.wait_gateway_routes(timeout)

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(p.log_tail(lines) for p in self.processes.values())

    # ------------------------------------------------------------------ gRPC

    def inference_stub(self) -> ipb_grpc.InferenceServiceStub:
        channel = getattr(self, "_inference_channel", None)
        if channel is None or getattr(self, "_inference_channel_port", None) != self.ports["inference"]:
            channel = grpc.insecure_channel(self.inference_addr)
            self._inference_channel, self._inference_channel_port = channel, self.ports["inference"]
        return ipb_grpc.InferenceServiceStub(channel)

    def health(self, name: str, service: str = "") -> int | None:
        """The gRPC health status of process ``name`` for ``service`` (None: no answer)."""
        with grpc.insecure_channel(f"{HOST}:{self.ports[name]}") as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None

    def wait_grpc_serving(self, name: str, timeout: float) -> None:
        proc = self.processes[name]

        def up() -> bool:
            if not proc.alive:
                raise RuntimeError(f"{name} exited with {proc.popen and proc.popen.returncode}\n{proc.log_tail()}")
            return self.health(name) == SERVING

        wait_until(up, timeout, f"{name} to serve", interval=0.2)

    def get_deployment(self) -> ipb.Deployment:
        return self.inference_stub().GetDeployment(ipb.GetDeploymentRequest(name=self.deployment_name), timeout=10)

    def wait_deployment_ready(self, timeout: float) -> ipb.Deployment:
        def ready() -> bool:
            dep = self.get_deployment()
            if dep.state == ipb.DEPLOYMENT_STATE_FAILED:
                raise RuntimeError(f"deployment failed: {dep.error.message}\n{self.log_tails()}")
            return dep.state == ipb.DEPLOYMENT_STATE_READY

        wait_until(ready, timeout, "the deployment to be READY", interval=0.2)
        return self.get_deployment()

    # ------------------------------------------------------------------ the engine

    def engine_url(self) -> str:
        endpoints = self.get_deployment().engine_endpoints
        assert endpoints, "the deployment has no engine endpoint (not READY)"
        return endpoints[0]

    def engine_pid(self) -> int:
        """The engine process: the inference service's child whose command line has ``--port PORT``."""
        port = self.engine_url().rsplit(":", 1)[1]
        for child in psutil.Process(self.processes["inference"].pid).children():
            cmd = child.cmdline()
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
                return child.pid
        raise AssertionError(f"no engine process listens on port {port}")

    def engine_running(self, url: str | None = None) -> int:
        """Requests the engine is generating now (its /health ``running``)."""
        return int(httpx.get((url or self.engine_url()) + "/health", timeout=10).json()["running"])

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of each process now (the engine too while there is one)."""
        out = {}
        for name in ("gateway", "inference"):
            proc = self.processes[name]
            if proc.alive:
                out[name] = psutil.Process(proc.pid).memory_info().rss / 2**20
        try:
            out["engine"] = psutil.Process(self.engine_pid()).memory_info().rss / 2**20
        except (AssertionError, grpc.RpcError, psutil.Error):
            pass
        return out

    # ------------------------------------------------------------------ the gateway

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)

    def create_key(self, name: str, **limits: int) -> dict:
        with self.admin() as client:
            reply = client.post("/admin/keys", json={"name": name, **limits})
        assert reply.status_code == 201, reply.text
        return reply.json()

    def gateway_routes(self) -> bool:
        """The gateway answers and routes the deployment's model."""
        try:
            reply = httpx.get(f"{self.gateway_url}/readyz", params={"model": self.deployment}, timeout=2)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def wait_gateway_routes(self, timeout: float) -> None:
        proc = self.processes["gateway"]

        def up() -> bool:
            if not proc.alive:
                raise RuntimeError(f"gateway exited with {proc.popen and proc.popen.returncode}\n{proc.log_tail()}")
            return self.gateway_routes()

        wait_until(up, timeout, "the gateway to route the deployment", interval=0.2)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
