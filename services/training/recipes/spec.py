"""The job spec of a training job as typed models: the one place its defaults, bounds and docs live.

The training service resolves a request into a complete spec with :meth:`Hyperparameters.resolve` (the
defaults of ms-swift's ``swift sft`` / ``swift rlhf``; the method-dependent ones are computed there and
nowhere else), stores it with the job, and the recipe parses the same spec back with :func:`parse_spec`.
The proto comments of ``modelyard.training.v1.Hyperparameters`` state the same defaults (a test checks).
A spec that does not parse is an InvalidArgument naming the field (``spec.hyperparameters.lora_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.core.errors import FieldViolation, InvalidArgument

SFT_METHODS = ("full", "lora", "qlora", "dora")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo", "cpo")
METHODS = SFT_METHODS + PREFERENCE_METHODS
# Hyperparameters that only apply to a vision-language base model (see services.training.recipes.vision).
VISION_HYPERPARAMETERS = ("freeze_vision_tower", "freeze_aligner", "vision_learning_rate", "aligner_learning_rate",
                          "max_images_per_sample")
Method = Literal["full", "lora", "qlora", "dora", "dpo", "orpo", "kto", "simpo", "cpo"]
LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Precision = Literal["fp32", "bf16", "fp16"]
LauncherKind = Literal["local", "torchrun", "deepspeed"]
LR_SCHEDULERS: tuple[str, ...] = LrScheduler.__args__  # type: ignore[attr-defined]
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
LAUNCHERS: tuple[str, ...] = LauncherKind.__args__  # type: ignore[attr-defined]

GLOBAL_BATCH = 16  # ms-swift: gradient accumulation defaults to ceil(16 / (batch * processes))
LORA_LEARNING_RATE = 1e-4
FULL_LEARNING_RATE = 1e-5
DEFAULT_BETA = 0.1
SIMPO_BETA = 2.0
FALLBACK_MAX_LENGTH = 2048  # when the model's config names no context length


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
    """Every hyperparameter of a job, resolved. Fields without a default depend on the method, the model or
    the node: :meth:`resolve` computes them (and only it)."""

    learning_rate: float = Field(gt=0, allow_inf_nan=False, description=(
        f"Peak learning rate. Default {LORA_LEARNING_RATE:g} ({FULL_LEARNING_RATE:g} for full-weight training)."))
    lr_scheduler: LrScheduler = Field(default="cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Fraction of steps used for linear warmup.")
    num_epochs: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                              description="Epochs over the training data; ignored when max_steps is set.")
    max_steps: int = Field(default=-1, description="Stop after this many optimizer steps (-1: run num_epochs).")
    batch_size: int = Field(default=1, ge=1, description="Per-device micro-batch size.")
    gradient_accumulation_steps: int = Field(ge=1, description=(
        f"Default: ceil({GLOBAL_BATCH} / (batch_size * processes)), a global batch of {GLOBAL_BATCH}."))
    max_length: int = Field(ge=8, description=(
        f"Maximum tokens per sample. Default: the model's context length ({FALLBACK_MAX_LENGTH} if unknown)."))
    seed: int = Field(default=42, description="Random seed.")
    packing: bool = Field(default=False, description="Pack several samples into one sequence of max_length.")
    lora_rank: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: str | list[str] = Field(default="all-linear", description="Modules that get adapters.")
    beta: float = Field(gt=0, allow_inf_nan=False, description=(
        f"Preference methods: strength of the preference term. Default {DEFAULT_BETA:g} (SimPO: {SIMPO_BETA:g})."))
    simpo_gamma: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="SimPO target reward margin.")
    precision: Precision = Field(description="Numeric precision; default: chosen for the node's accelerator.")
    weight_decay: float = Field(default=0.1, ge=0, allow_inf_nan=False, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="Gradient clipping.")
    gradient_checkpointing: bool = Field(default=True, description="Activation checkpointing.")
    # Vision-language models only: preflight refuses non-default values for a text-only base model.
    freeze_vision_tower: bool = Field(default=True, description="Keep the vision tower's weights as they are.")
    freeze_aligner: bool = Field(default=True, description=(
        "Keep the aligner (projector; Qwen2-VL's visual.merger) as it is."))
    vision_learning_rate: float = Field(gt=0, allow_inf_nan=False, description=(
        "Learning rate of an unfrozen vision tower. Default: learning_rate."))
    aligner_learning_rate: float = Field(gt=0, allow_inf_nan=False, description=(
        "Learning rate of an unfrozen aligner. Default: learning_rate."))
    max_images_per_sample: int = Field(default=8, ge=1, description="Most images one row may hold.")

    @model_validator(mode="before")
    @classmethod
    def _part_learning_rates(cls, values: Any) -> Any:
        """The vision / aligner learning rates default to ``learning_rate`` (also for specs stored before they
        existed)."""
        if isinstance(values, Mapping) and "learning_rate" in values:
            lr = values["learning_rate"]
            if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
                lr = LORA_LEARNING_RATE  # learning_rate itself is refused; only its violation is reported
            values = {**values}
            for name in ("vision_learning_rate", "aligner_learning_rate"):
                if values.get(name) is None:
                    values[name] = lr
        return values

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be >= 1 when set, got {value}")
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or value == ["all-linear"]):
            return "all-linear"
        return value

    @staticmethod
    def derived_defaults(*, method: str, use_lora: bool, batch_size: int, num_processes: int,
                         context_length: int) -> dict[str, Any]:
        """The defaults that depend on the method, the batch, the launch or the model (ms-swift's rules)."""
        return {
            "learning_rate": LORA_LEARNING_RATE if use_lora else FULL_LEARNING_RATE,
            "beta": SIMPO_BETA if method == "simpo" else DEFAULT_BETA,
            "gradient_accumulation_steps": max(1, math.ceil(GLOBAL_BATCH / (batch_size * max(1, num_processes)))),
            "max_length": context_length or FALLBACK_MAX_LENGTH,
        }

    @classmethod
    def resolve(cls, given: Mapping[str, Any], *, method: str, use_lora: bool, precision: str,
                num_processes: int = 1, context_length: int = 0) -> Hyperparameters:
        """``given`` (the values a caller set; None means unset) with every default filled.

        ValidationError names the fields of ``given`` that are out of bounds.
        """
        values = {k: v for k, v in given.items() if v is not None and k in cls.model_fields}
        batch = values.get("batch_size")
        batch = batch if isinstance(batch, int) and batch >= 1 else cls.model_fields["batch_size"].default
        derived = cls.derived_defaults(method=method, use_lora=use_lora, batch_size=batch,
                                       num_processes=num_processes, context_length=context_length)
        return cls.model_validate({**derived, "precision": precision, **values})

    @classmethod
    def violations(cls, given: Mapping[str, Any], *, method: str, use_lora: bool) -> list[FieldViolation]:
        """The out-of-bounds fields of ``given`` (``spec.hyperparameters.<name>``), checked without I/O."""
        try:
            cls.resolve({k: v for k, v in given.items() if k != "precision"}, method=method, use_lora=use_lora,
                        precision="fp32")
        except ValidationError as exc:
            return field_violations(exc, "spec.hyperparameters")
        return []


class Launcher(_Model):
    kind: LauncherKind = Field(default="local", description="How the training ranks are started.")
    num_processes: int = Field(default=1, ge=1, description="Ranks (one per GPU, or CPU processes over gloo).")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage (2 by default with deepspeed).")
    offload: bool = Field(default=False, description="DeepSpeed: offload optimizer states to CPU memory.")
    offload_parameters: bool = Field(default=False, description="DeepSpeed ZeRO-3: offload parameters to CPU memory.")

    @classmethod
    def resolve(cls, kind: str, num_processes: int, *, zero_stage: int = 0, offload_optimizer: bool = False,
                offload_parameters: bool = False) -> Launcher:
        """The launcher of a job: ZeRO stage 2 unless set when the launcher is deepspeed, none otherwise."""
        zero = (zero_stage or 2) if kind == "deepspeed" else 0
        return cls.model_validate({"kind": kind, "num_processes": num_processes, "zero_stage": zero,
                                   "offload": offload_optimizer, "offload_parameters": offload_parameters})


class Output(_Model):
    model: str
    merge: bool = False
    description: str = ""


class S3Ref(_Model):
    endpoint: str
    bucket: str
    secure: bool = False


class EvalAfter(_Model):
    benchmarks: list[str] = Field(min_length=1)
    limit: int = Field(default=0, ge=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    include_base: bool = False


class TrainingSpec(_Model):
    method: Method
    use_lora: bool = True
    base_model: BaseModelRef
    datasets: list[DatasetRef] = Field(min_length=1)
    validation_dataset: DatasetRef | None = None
    validation_split: float = Field(default=0.0, ge=0, lt=1)
    hyperparameters: Hyperparameters
    launcher: Launcher = Launcher()
    log_every_steps: int = Field(default=1, ge=1)
    eval_every_steps: int = Field(default=0, ge=0)
    checkpoint_every_steps: int = Field(default=0, ge=0)
    output: Output
    s3: S3Ref
    registry_addr: str = ""
    omp_num_threads: int = Field(default=1, ge=1)
    eval_after: EvalAfter | None = None
    evaluation_addr: str = ""

    @property
    def is_preference(self) -> bool:
        return self.method in PREFERENCE_METHODS

    @property
    def trains_adapter(self) -> bool:
        """True when the trained weights are a PEFT adapter (lora/qlora/dora, or a preference run with LoRA)."""
        return self.method in ("lora", "qlora", "dora") or (self.is_preference and self.use_lora)


def field_violations(exc: ValidationError, prefix: str) -> list[FieldViolation]:
    """One violation per error of ``exc``, its field named ``{prefix}.<path>``."""
    return [FieldViolation(".".join([prefix, *(str(p) for p in e["loc"])]), e["msg"]) for e in exc.errors()]


def parse_spec(raw: dict[str, Any]) -> TrainingSpec:
    """The typed spec; InvalidArgument with one violation per bad field (``spec.<path>``)."""
    try:
        return TrainingSpec.model_validate(raw)
    except ValidationError as exc:
        violations = field_violations(exc, "spec")
        detail = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid training spec: {detail}", reason="INVALID_TRAINING_SPEC",
                              violations=violations) from None
