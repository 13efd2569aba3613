"""Settings of the evaluation service (env prefix ``YARD_EVALUATION_``, nested with ``__``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import JobServiceSettings


class EvaluationSettings(JobServiceSettings):
    """Everything the evaluation service reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(env_prefix="YARD_EVALUATION_", env_nested_delimiter="__", extra="ignore")

    # The registry (model versions, custom sets; scores are recorded on versions there).
    registry_addr: str = "127.0.0.1:50051"
    # The inference service: deployments under test, temporary deployments of model versions.
    inference_addr: str = "127.0.0.1:50055"
    # Engine of the temporary deployment of a model-version target ("vllm": the serving engine; "auto": vllm
    # when the inference service can run it, else transformers).
    deploy_engine: Literal["auto", "vllm", "transformers"] = "auto"
    # Seconds a temporary deployment may take to become READY.
    deploy_timeout_s: float = 900.0
    # Engine options of a temporary deployment (0: the engine's default).
    deploy_max_model_len: int = 0
    deploy_max_num_seqs: int = 0
    deploy_kv_cache_bytes: int = 1 << 30
    # Samples scored concurrently when the spec does not say.
    default_concurrency: int = 8
    # Benchmark data fetched from a hub is cached here; empty: <data_dir>/benchmark-cache.
    cache_dir: Path | None = None
    # Hugging Face hub (or mirror) and ModelScope endpoints of the benchmark loaders.
    hf_endpoint: str = Field(default_factory=lambda: os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    hf_token: str | None = Field(default_factory=lambda: os.environ.get("HF_TOKEN") or None)
    modelscope_endpoint: str = "https://modelscope.cn"
    # Where benchmarks without bundled data load from: auto (bundled, then Hugging Face), hf, modelscope.
    benchmark_hub: Literal["auto", "hf", "modelscope"] = "auto"
    # Generated code (HumanEval): wall seconds and memory per sample in the sandbox.
    sandbox_timeout_s: float = 10.0
    sandbox_memory_bytes: int = 1 << 30
    # Run generated code even where a sandbox layer (network namespace, Landlock) is missing.
    sandbox_allow_degraded: bool = False
    # SIGTERM -> SIGKILL delay on cancel: the job removes its temporary deployment in that time.
    cancel_grace_s: float = 60.0

    def cache_path(self) -> Path:
        path = self.cache_dir or (self.data_dir / "benchmark-cache")
        path.mkdir(parents=True, exist_ok=True)
        return path
