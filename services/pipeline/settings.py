"""Settings of the pipeline service (env prefix ``YARD_PIPELINE_``, nested with ``__``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.local_paths import LocalSourceSettings
from services.core.settings import DEFAULT_PORTS, JobServiceSettings

ALLOWED_ROOTS_SETTING = "YARD_PIPELINE_IMPORTS__ALLOWED_ROOTS"


def _addr(service: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[service]}"


class PipelineSettings(JobServiceSettings):
    """Everything the pipeline service reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(env_prefix="YARD_PIPELINE_", env_nested_delimiter="__", extra="ignore")

    # The services the steps call (each through its public gRPC API).
    registry_addr: str = _addr("registry")
    training_addr: str = _addr("training")
    quantization_addr: str = _addr("quantization")
    evaluation_addr: str = _addr("evaluation")
    inference_addr: str = _addr("inference")
    # Runs executed at once by this process (a run mostly waits on other services' jobs).
    worker_slots: int = 4
    # A run is a long wait on other services: it survives two lost workers before it fails.
    max_attempts: int = 3
    # Where local paths of a document (dataset files, import sources) may lie (ALLOWED_ROOTS: "a,b" or JSON;
    # empty: the single-machine defaults on a loopback address, none otherwise).
    imports: LocalSourceSettings = Field(default_factory=LocalSourceSettings)
