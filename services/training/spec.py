"""What a caller asks for (``TrainingRequest``) and the static checks and defaults of a job spec.

The job spec dict itself (the contract with the recipes, see ``services.training.recipes``) is
assembled by ``build_job_spec`` once preflight has resolved the registry inputs and the hardware.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import FieldViolation, InvalidArgument

SFT_METHODS = ("full", "lora", "qlora", "dora")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo", "cpo")
METHODS = SFT_METHODS + PREFERENCE_METHODS
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LAUNCHERS = ("local", "torchrun", "deepspeed")
GLOBAL_BATCH = 16  # ms-swift: gradient accumulation defaults to 16 / (batch * processes)

# Row formats a method can train on.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    **{m: ("messages", "alpaca", "sharegpt") for m in SFT_METHODS},
    **{m: ("preference",) for m in ("dpo", "orpo", "simpo", "cpo")},
    "kto": ("kto", "preference"),
}

JOB_ID_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_NAME_RE = re.compile(r"^models/[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# Hyperparameters a request may set, with their types (None values mean "default").
HYPERPARAMETER_TYPES: dict[str, type] = {
    "learning_rate": float, "lr_scheduler": str, "warmup_ratio": float, "num_epochs": float, "max_steps": int,
    "batch_size": int, "gradient_accumulation_steps": int, "max_length": int, "seed": int, "packing": bool,
    "lora_rank": int, "lora_alpha": float, "lora_dropout": float, "lora_target_modules": list,
    "beta": float, "simpo_gamma": float, "precision": str, "weight_decay": float, "max_grad_norm": float,
    "gradient_checkpointing": bool, "validation_split": float,
}


@dataclass
class LauncherRequest:
    kind: str = "local"
    num_processes: int = 0  # 0: one per visible GPU (1 without a GPU)
    zero_stage: int = 0  # 0: stage 2 when the launcher is deepspeed
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class TrainingRequest:
    """A CreateTrainingJob call in plain Python (only the fields the caller set in ``hyperparameters``)."""

    base_model_version: str
    dataset_versions: list[str]
    method: str
    validation_dataset_version: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    launcher: LauncherRequest = field(default_factory=LauncherRequest)
    checkpoint_every_steps: int = 0
    eval_every_steps: int = 0
    log_every_steps: int = 0
    output_model: str = ""
    merge_adapter: bool = False
    full_weights: bool = False
    display_name: str = ""
    job_id: str = ""

    @property
    def use_lora(self) -> bool:
        if self.method in PREFERENCE_METHODS:
            return not self.full_weights
        return self.method != "full"


def _positive(errors: list[FieldViolation], hp: dict[str, Any], name: str, *, allow_zero: bool = False) -> None:
    value = hp.get(name)
    if value is not None and (value < 0 or (value == 0 and not allow_zero) or
                              (isinstance(value, float) and not math.isfinite(value))):
        errors.append(FieldViolation(f"spec.hyperparameters.{name}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value}"))


def check_request(req: TrainingRequest) -> None:
    """Static checks (no I/O): InvalidArgument with one violation per bad field."""
    errors: list[FieldViolation] = []

    def bad(field_name: str, description: str) -> None:
        errors.append(FieldViolation(field_name, description))

    if req.method not in METHODS:
        bad("spec.method", f"must be one of {', '.join(METHODS)}" + (f", got {req.method!r}" if req.method else ""))
    if not req.base_model_version:
        bad("spec.base_model_version", "is required (models/{model}/versions/{version})")
    if not req.dataset_versions:
        bad("spec.dataset_versions", "at least one dataset version is required")
    for i, name in enumerate(req.dataset_versions):
        if not name:
            bad(f"spec.dataset_versions[{i}]", "must not be empty")
    if req.job_id and not JOB_ID_RE.match(req.job_id):
        bad("training_job_id", f"{req.job_id!r} must be 1-63 lowercase letters, digits or hyphens, starting with a letter")
    if req.output_model and not MODEL_NAME_RE.match(req.output_model):
        bad("spec.output_model", f"{req.output_model!r} must look like models/{{model}}")
    if req.merge_adapter and not req.use_lora:
        bad("spec.merge_adapter", f"method {req.method} trains full weights; there is no adapter to merge")
    for name in ("checkpoint_every_steps", "eval_every_steps", "log_every_steps"):
        if getattr(req, name) < 0:
            bad(f"spec.{name}", f"must be >= 0, got {getattr(req, name)}")

    hp = req.hyperparameters
    for name in ("learning_rate", "num_epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                 "lora_rank", "lora_alpha", "beta"):
        _positive(errors, hp, name)
    for name in ("weight_decay", "max_grad_norm", "simpo_gamma"):
        _positive(errors, hp, name, allow_zero=True)
    for name, upper in (("warmup_ratio", 1.0), ("lora_dropout", 1.0), ("validation_split", 1.0)):
        value = hp.get(name)
        if value is not None and not 0 <= value < upper:
            bad(f"spec.hyperparameters.{name}", f"must be within [0, {upper:g}), got {value}")
    if hp.get("max_steps") is not None and hp["max_steps"] < 1:
        bad("spec.hyperparameters.max_steps", f"must be >= 1 when set, got {hp['max_steps']}")
    if hp.get("lr_scheduler", "cosine") not in LR_SCHEDULERS:
        bad("spec.hyperparameters.lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
    if hp.get("precision", "auto") not in PRECISIONS:
        bad("spec.hyperparameters.precision", f"must be one of {', '.join(PRECISIONS)}")
    if hp.get("validation_split") and req.validation_dataset_version:
        bad("spec.hyperparameters.validation_split", "set either validation_split or validation_dataset_version")

    launcher = req.launcher
    if launcher.kind not in LAUNCHERS:
        bad("spec.launcher.type", f"must be one of {', '.join(LAUNCHERS)}")
    if launcher.num_processes < 0:
        bad("spec.launcher.num_processes", f"must be >= 0, got {launcher.num_processes}")
    if launcher.kind != "deepspeed" and (launcher.zero_stage or launcher.offload_optimizer or launcher.offload_parameters):
        bad("spec.launcher.zero_stage", "ZeRO stage and offloading need the deepspeed launcher")
    if launcher.offload_parameters and launcher.zero_stage not in (3,):
        bad("spec.launcher.offload_parameters", "parameter offload needs ZeRO stage 3")
    if launcher.kind == "local" and launcher.num_processes > 1:
        bad("spec.launcher.num_processes", "the local launcher runs one process; use torchrun or deepspeed")
    if errors:
        summary = "; ".join(f"{v.field}: {v.description}" for v in errors)
        raise InvalidArgument(f"invalid training job: {summary}", reason="INVALID_TRAINING_SPEC", violations=errors)


def resolve_hyperparameters(req: TrainingRequest, *, precision: str, context_length: int,
                            num_processes: int) -> dict[str, Any]:
    """Every hyperparameter with its default filled (ms-swift's ``swift sft`` / ``swift rlhf``)."""
    hp = {k: v for k, v in req.hyperparameters.items() if v is not None}
    batch = int(hp.get("batch_size", 1))
    targets = list(hp.get("lora_target_modules") or ["all-linear"])
    return {
        "learning_rate": float(hp.get("learning_rate", 1e-4 if req.use_lora else 1e-5)),
        "lr_scheduler": hp.get("lr_scheduler", "cosine"),
        "warmup_ratio": float(hp.get("warmup_ratio", 0.05)),
        "num_epochs": float(hp.get("num_epochs", 1)),
        "max_steps": int(hp.get("max_steps", -1)),
        "batch_size": batch,
        "gradient_accumulation_steps": int(hp.get("gradient_accumulation_steps",
                                               max(1, GLOBAL_BATCH // (batch * max(1, num_processes))))),
        "max_length": int(hp.get("max_length", context_length or 2048)),
        "seed": int(hp.get("seed", 42)),
        "packing": bool(hp.get("packing", False)),
        "lora_rank": int(hp.get("lora_rank", 8)),
        "lora_alpha": float(hp.get("lora_alpha", 32)),
        "lora_dropout": float(hp.get("lora_dropout", 0.05)),
        "lora_target_modules": "all-linear" if targets == ["all-linear"] else targets,
        "beta": float(hp.get("beta", 2.0 if req.method == "simpo" else 0.1)),
        "simpo_gamma": float(hp.get("simpo_gamma", 1.0)),
        "precision": precision,
        "weight_decay": float(hp.get("weight_decay", 0.1)),
        "max_grad_norm": float(hp.get("max_grad_norm", 1.0)),
        "gradient_checkpointing": bool(hp.get("gradient_checkpointing", True)),
    }


def file_type_of(filename: str) -> str:
    """``jsonl`` / ``json`` / ``parquet`` from a dataset file name (``.gz`` is read through)."""
    name = filename.lower().removesuffix(".gz")
    for suffix in ("jsonl", "json", "parquet"):
        if name.endswith("." + suffix):
            return suffix
    return "jsonl"
