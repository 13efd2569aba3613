"""What a caller asks for (``TrainingRequest``) and its static checks.

Defaults, bounds and docs of the hyperparameters live in one model,
:class:`services.training.recipes.spec.Hyperparameters`; preflight resolves a request into the job spec
with it once the registry inputs and the hardware are known, and the recipe parses that spec back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import FieldViolation, InvalidArgument

from .recipes.spec import (
    LAUNCHERS,
    METHODS,
    PREFERENCE_METHODS,
    SFT_METHODS,
    Hyperparameters,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what a request may ask for ("auto": chosen for the node)

# Row formats a method can train on.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    **{m: ("messages", "alpaca", "sharegpt") for m in SFT_METHODS},
    **{m: ("preference",) for m in ("dpo", "orpo", "simpo", "cpo")},
    "kto": ("kto", "preference"),
}

JOB_ID_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_NAME_RE = re.compile(r"^models/[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
    eval_after: dict[str, Any] | None = None  # {benchmarks, limit, num_fewshot, include_base}

    @property
    def use_lora(self) -> bool:
        if self.method in PREFERENCE_METHODS:
            return not self.full_weights
        return self.method != "full"


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
    errors += Hyperparameters.violations(hp, method=req.method, use_lora=req.use_lora)  # bounds: method-independent
    if hp.get("precision", "auto") not in PRECISIONS:
        bad("spec.hyperparameters.precision", f"must be one of {', '.join(PRECISIONS)}")
    split = hp.get("validation_split")
    if split is not None and not 0 <= split < 1:
        bad("spec.hyperparameters.validation_split", f"must be within [0, 1), got {split}")
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
                            num_processes: int) -> Hyperparameters:
    """Every hyperparameter with its default filled (see :meth:`Hyperparameters.resolve`)."""
    return Hyperparameters.resolve({k: v for k, v in req.hyperparameters.items() if k != "precision"},
                                   method=req.method, use_lora=req.use_lora, precision=precision,
                                   num_processes=num_processes, context_length=context_length)


def file_type_of(filename: str) -> str:
    """``jsonl`` / ``json`` / ``parquet`` from a dataset file name (``.gz`` is read through)."""
    name = filename.lower().removesuffix(".gz")
    for suffix in ("jsonl", "json", "parquet"):
        if name.endswith("." + suffix):
            return suffix
    return "jsonl"
