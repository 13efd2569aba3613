"""Settings of the quantization service (env prefix ``YARD_QUANTIZATION_``, nested with ``__``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import SettingsConfigDict

from services.core.settings import JobServiceSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class QuantizationSettings(JobServiceSettings):
    """Everything the quantization service reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(env_prefix="YARD_QUANTIZATION_", env_nested_delimiter="__", extra="ignore")

    # The registry (source versions, calibration datasets); jobs register their outputs there too.
    registry_addr: str = "127.0.0.1:50051"
    # The training service: `merge_adapter` jobs ask it to merge an adapter before quantizing.
    training_addr: str = "127.0.0.1:50052"
    # The quantizers' virtualenv (`make engine-quant`): llm-compressor, GPTQModel, AutoAWQ.
    quant_venv: Path = PROJECT_ROOT / ".venv-quant"
    # The vLLM engine's virtualenv: the engine that serves the results loads each one before it is registered.
    vllm_venv: Path = PROJECT_ROOT / ".venv-vllm"
    # Where a result is loaded and asked once before it is registered (it is always scored in transformers
    # where transformers can load it): "vllm" (about a minute per job on CPU), "transformers" (only), or
    # "auto": vllm when vllm_venv exists. AutoAWQ output, which transformers cannot run on CPU, always uses vllm.
    verify_engine: Literal["auto", "vllm", "transformers"] = "auto"
    # SIGTERM -> SIGKILL delay when a job is cancelled (the quantizer holds no state worth a longer wait).
    cancel_grace_s: float = 10.0
    # Fraction of the free memory a job's estimate may use, and whether to refuse above it.
    memory_headroom: float = 0.9
    memory_check: bool = True
    # OMP_NUM_THREADS of the quantizer process.
    omp_num_threads: int = 1
    # Held-out tokens scored for perplexity / top-1 agreement, in windows of eval_seq_len.
    eval_tokens: int = 2048
    eval_seq_len: int = 256
