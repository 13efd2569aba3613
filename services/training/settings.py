"""Settings of the training service (env prefix ``YARD_TRAINING_``, nested with ``__``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.core.settings import JobServiceSettings


class TrainingSettings(JobServiceSettings):
    """Everything the training service reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(env_prefix="YARD_TRAINING_", env_nested_delimiter="__", extra="ignore")

    # The registry (models, datasets, lineage); jobs register their outputs there too.
    registry_addr: str = "127.0.0.1:50051"
    # The evaluation service: a job's `eval_after` benchmarks are checked there before the job is queued, and the
    # job asks it to evaluate its result once registered.
    evaluation_addr: str = "127.0.0.1:50054"
    # Checkpoint interval when a spec leaves it at 0.
    default_checkpoint_every_steps: int = 500
    # Most processes a torchrun/DeepSpeed job may ask for on this node (0: one per GPU).
    max_processes: int = 0
    # Fraction of the free memory (per GPU, or RAM on CPU) a job's estimate may use.
    memory_headroom: float = 0.9
    # OMP_NUM_THREADS of job processes.
    omp_num_threads: int = 1
    # Check memory against the estimate before queueing (false: skip the refusal, keep the estimate).
    memory_check: bool = True
