"""The job spec the training service builds (see the package docstring), as typed models.

The service fills every default; the same defaults live here so a spec can be parsed on its own.
A spec that does not parse is an InvalidArgument naming the field (``spec.hyperparameters.lora_rank``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.errors import FieldViolation, InvalidArgument

SFT_METHODS = ("full", "lora", "qlora", "dora")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo", "cpo")
Method = Literal["full", "lora", "qlora", "dora", "dpo", "orpo", "kto", "simpo", "cpo"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileRef(_Model):
    path: str
    size: int
    sha256: str


class BaseModelRef(_Model):
    name: str
    artifact_prefix: str
    files: list[FileRef] = Field(default_factory=list)


class DatasetRef(_Model):
    name: str
    key: str
    sha256: str
    format: Literal["messages", "alpaca", "sharegpt", "preference", "kto"]
    file_type: Literal["jsonl", "json", "parquet"] | None = None


class Hyperparameters(_Model):
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    num_epochs: float = Field(1, gt=0)
    max_steps: int = -1
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=8)
    seed: int = 42
    packing: bool = False
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"
    beta: float = Field(0.1, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)


class Launcher(_Model):
    kind: Literal["local", "torchrun", "deepspeed"] = "local"
    num_processes: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False


class Output(_Model):
    model: str
    merge: bool = False
    description: str = ""


class S3Ref(_Model):
    endpoint: str
    bucket: str
    secure: bool = False


class TrainingSpec(_Model):
    method: Method
    use_lora: bool = True
    base_model: BaseModelRef
    datasets: list[DatasetRef] = Field(min_length=1)
    validation_dataset: DatasetRef | None = None
    validation_split: float = Field(0.0, ge=0, lt=1)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    launcher: Launcher = Field(default_factory=Launcher)
    log_every_steps: int = Field(1, ge=1)
    eval_every_steps: int = Field(0, ge=0)
    checkpoint_every_steps: int = Field(0, ge=0)
    output: Output
    s3: S3Ref
    registry_addr: str = ""
    omp_num_threads: int = Field(1, ge=1)

    @property
    def is_preference(self) -> bool:
        return self.method in PREFERENCE_METHODS

    @property
    def trains_adapter(self) -> bool:
        """True when the trained weights are a PEFT adapter (lora/qlora/dora, or a preference run with LoRA)."""
        return self.method in ("lora", "qlora", "dora") or (self.is_preference and self.use_lora)


def parse_spec(raw: dict[str, Any]) -> TrainingSpec:
    """The typed spec; InvalidArgument with one violation per bad field (``spec.<path>``)."""
    try:
        return TrainingSpec.model_validate(raw)
    except ValidationError as exc:
        violations = [FieldViolation("spec." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        detail = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid training spec: {detail}", reason="INVALID_TRAINING_SPEC",
                              violations=violations) from None
