"""The console's clients of the other services (the SDK of ``modelyard.client``), made on first use.

Every call goes through ``calling(service)``: an unreachable service or one that does not answer in
time becomes a 503 / 504 naming the service and its address, so the page can say which one is down.
The pipeline service's SDK is imported only when needed: a gateway without it (or a stack without
the service) answers "pipeline service unavailable" for pipeline runs and shows everything else.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from modelyard.client import (
    DeadlineExceeded,
    EvaluationClient,
    InferenceClient,
    QuantizationClient,
    RegistryClient,
    ServiceClient,
    TrainingClient,
    Unavailable,
)

from ..settings import GatewaySettings

SERVICES = ("registry", "training", "quantization", "evaluation", "inference", "pipeline")


class ServiceDown(Unavailable):
    """A service the console needs did not answer (HTTP 503, code ``service_unavailable``)."""

    def __init__(self, service: str, address: str, detail: str) -> None:
        super().__init__(
            f"{service} service unavailable ({address}): {detail}",
            reason="SERVICE_UNAVAILABLE",
            metadata={"service": service, "address": address},
        )
        self.service = service


class ServiceTimeout(DeadlineExceeded):
    def __init__(self, service: str, address: str, timeout_s: float) -> None:
        super().__init__(
            f"{service} service ({address}) did not answer within {timeout_s:g} s",
            reason="SERVICE_TIMEOUT",
            metadata={"service": service, "address": address},
        )
        self.service = service


def _pipeline_client_class() -> type[ServiceClient]:
    try:
        module = importlib.import_module("modelyard.client.pipeline")
        return module.PipelineClient
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"the pipeline SDK (modelyard.client.PipelineClient) is not installed: {exc}") from None


class ConsoleServices:
    """One client per service (several for inference replicas), bound to the loop that made them."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self.timeout_s = settings.console.rpc_timeout_s
        self.addresses: dict[str, str] = {
            "registry": settings.registry_addr,
            "training": settings.training_addr,
            "quantization": settings.quantization_addr,
            "evaluation": settings.evaluation_addr,
            "pipeline": settings.pipeline_addr,
            "inference": ",".join(settings.inference_addrs),
        }
        self._clients: dict[str, ServiceClient] = {}
        self._credentials = settings.service_credentials()

    def _client(self, key: str, cls: type[ServiceClient], address: str) -> Any:
        client = self._clients.get(key)
        if client is None:
            client = cls(
                address,
                timeout=self.timeout_s,
                retry_attempts=2,
                retry_backoff_s=0.1,
                retry_max_backoff_s=0.5,
                credentials=self._credentials,
            )
            self._clients[key] = client
        return client

    @property
    def registry(self) -> RegistryClient:
        return self._client("registry", RegistryClient, self.addresses["registry"])

    @property
    def training(self) -> TrainingClient:
        return self._client("training", TrainingClient, self.addresses["training"])

    @property
    def quantization(self) -> QuantizationClient:
        return self._client("quantization", QuantizationClient, self.addresses["quantization"])

    @property
    def evaluation(self) -> EvaluationClient:
        return self._client("evaluation", EvaluationClient, self.addresses["evaluation"])

    def inference_replicas(self) -> list[tuple[str, InferenceClient]]:
        return [
            (addr, self._client(f"inference@{addr}", InferenceClient, addr)) for addr in self._settings.inference_addrs
        ]

    @property
    def pipeline(self) -> Any:
        """The PipelineClient; ``ServiceDown`` when the pipeline SDK is not installed."""
        try:
            cls = _pipeline_client_class()
        except ImportError as exc:
            raise ServiceDown("pipeline", self.addresses["pipeline"], str(exc)) from None
        return self._client("pipeline", cls, self.addresses["pipeline"])

    @contextmanager
    def calling(self, service: str, address: str | None = None) -> Iterator[None]:
        """Calls of ``service`` inside: UNAVAILABLE and deadline errors name the service."""
        addr = address or self.addresses[service]
        try:
            yield
        except (ServiceDown, ServiceTimeout):
            raise
        except Unavailable as exc:
            raise ServiceDown(service, addr, exc.message) from None
        except DeadlineExceeded:
            raise ServiceTimeout(service, addr, self.timeout_s) from None

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()
