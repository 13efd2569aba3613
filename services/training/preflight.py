"""Preflight of CreateTrainingJob: every check that can fail a job runs here, before anything is queued.

Order: the request itself -> base model (exists, READY) -> datasets (exist, format fits the method,
every row valid per the registry's ValidateDataset) -> hardware (method, precision, launcher) ->
memory estimate against what this node has. The result is the complete job spec for the recipes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from services.core.artifacts import ArtifactStore
from services.core.credentials import ClientCredentials
from services.core.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
)
from services.core.hardware import Hardware, choose_precision
from services.core.logging import get_logger
from services.core.registry_refs import (
    DatasetVersionInfo,
    ModelVersionInfo,
    RegistryReader,
    naming,
    ready_model_version,
)
from services.core.settings import S3Settings
from services.core.vision import is_vision_config

from .memory import MemoryEstimate, MemoryRequest, ModelShape, estimate_memory, gib
from .recipes.spec import PREFERENCE_METHODS, VISION_HYPERPARAMETERS, Hyperparameters, Launcher, TrainingSpec
from .spec import METHOD_FORMATS, TrainingRequest, check_request, file_type_of, resolve_hyperparameters

log = get_logger(__name__)

HARDWARE_UNSUPPORTED = "HARDWARE_UNSUPPORTED"
MAX_ROW_VIOLATIONS = 50  # violations listed per refusal (the message gives the total)
IMAGE_PIXELS_CAP = 1024 * 1024  # the largest image the memory estimate assumes


@dataclass(frozen=True)
class PreflightOptions:
    """The service settings preflight reads."""

    s3: S3Settings
    registry_addr: str
    default_checkpoint_every_steps: int = 500
    max_processes: int = 0
    memory_headroom: float = 0.9
    memory_check: bool = True
    omp_num_threads: int = 1
    evaluation_addr: str = ""
    credentials: ClientCredentials | None = None  # of calls to the evaluation service (None: the SDK's defaults)


@dataclass(frozen=True)
class PreflightResult:
    spec: dict[str, Any]  # the job spec (contract with the recipes)
    summary: dict[str, Any]  # accelerator, precision, memory numbers (stored with the job)


class Preflight:
    def __init__(self, registry: RegistryReader, store: ArtifactStore, hardware: Hardware, options: PreflightOptions) -> None:
        self.registry = registry
        self.store = store
        self.hardware = hardware
        self.options = options

    async def check(self, req: TrainingRequest) -> PreflightResult:
        """The job spec, or the typed error that refuses the job."""
        check_request(req)
        base = await self._base_model(req.base_model_version, "spec.base_model_version")
        datasets = [await self._dataset(name, f"spec.dataset_versions[{i}]", req.method)
                    for i, name in enumerate(req.dataset_versions)]
        validation = (await self._dataset(req.validation_dataset_version, "spec.validation_dataset_version", req.method)
                      if req.validation_dataset_version else None)
        await self._check_rows(datasets, validation)
        processes = self._processes(req)
        precision = self._precision(req)
        config = await self._config(base)
        shape = self._shape(base, config)
        hp = resolve_hyperparameters(req, precision=precision, context_length=base.context_length,
                                     num_processes=processes)
        vision = is_vision_config(config)
        self._check_vision(req, hp, vision)
        launcher = Launcher.resolve(req.launcher.kind, processes, zero_stage=req.launcher.zero_stage,
                                    offload_optimizer=req.launcher.offload_optimizer,
                                    offload_parameters=req.launcher.offload_parameters)
        estimate = estimate_memory(shape, MemoryRequest(
            method=req.method, use_lora=req.use_lora, precision=precision, batch_size=hp.batch_size,
            max_length=hp.max_length, lora_rank=hp.lora_rank, gradient_checkpointing=hp.gradient_checkpointing,
            accelerator=self.hardware.accelerator, num_processes=processes, zero_stage=launcher.zero_stage,
            offload_optimizer=launcher.offload, offload_parameters=launcher.offload_parameters,
            train_vision=not hp.freeze_vision_tower, train_aligner=not hp.freeze_aligner,
            image_patches_per_sample=await self._image_patches(base, config, hp.max_images_per_sample) if vision else 0))
        available = self._check_memory(estimate, processes, req)
        checkpoint_every = req.checkpoint_every_steps or self.options.default_checkpoint_every_steps
        has_eval = validation is not None or bool(req.hyperparameters.get("validation_split"))
        output_model = req.output_model or f"models/{base.name.split('/')[1]}-{req.method}"
        spec = TrainingSpec.model_validate({
            "method": req.method,
            "use_lora": req.use_lora,
            "base_model": {"name": base.name, "artifact_prefix": base.artifact_prefix, "files": base.files},
            "datasets": [self._dataset_ref(d) for d in datasets],
            "validation_dataset": self._dataset_ref(validation) if validation else None,
            "validation_split": float(req.hyperparameters.get("validation_split") or 0.0),
            "hyperparameters": hp,
            "launcher": launcher,
            "log_every_steps": req.log_every_steps or 1,
            "eval_every_steps": req.eval_every_steps or (checkpoint_every if has_eval else 0),  # 0: at checkpoints
            "checkpoint_every_steps": checkpoint_every,
            "output": {"model": output_model, "merge": req.merge_adapter, "description": req.display_name},
            "s3": {"endpoint": self.options.s3.endpoint, "bucket": self.options.s3.bucket,
                   "secure": self.options.s3.secure},
            "registry_addr": self.options.registry_addr,
            "omp_num_threads": self.options.omp_num_threads,
            "eval_after": await self._eval_after(req, base.name),
            "evaluation_addr": self.options.evaluation_addr if req.eval_after else "",
        }).model_dump(mode="json")
        summary = {"accelerator": self.hardware.accelerator, "precision": precision,
                   "estimated_memory_bytes": estimate.total, "available_memory_bytes": available,
                   "parameter_count": shape.parameter_count, "trainable_parameter_count": estimate.trainable_parameters,
                   "memory": estimate.describe()}
        return PreflightResult(spec, summary)

    async def _eval_after(self, req: TrainingRequest, base: str) -> dict[str, Any] | None:
        """``eval_after`` checked by the evaluation service (its benchmarks and options, on the base version as a
        stand-in target) so a typo fails now, not after training."""
        ea = req.eval_after
        if not ea or not ea.get("benchmarks"):
            return None
        if not self.options.evaluation_addr:
            raise FailedPrecondition("spec.eval_after: no evaluation service is configured (evaluation_addr)",
                                     reason="EVALUATION_SERVICE_MISSING")
        from modelyard.client import EvaluationClient
        from modelyard.evaluation.v1 import evaluation_pb2 as epb

        spec = epb.EvaluationSpec(model_version=base, limit=int(ea.get("limit") or 0), num_fewshot=ea.get("num_fewshot"))
        for name in ea["benchmarks"]:
            spec.benchmarks.add(benchmark=name if name.startswith("benchmarks/") else f"benchmarks/{name}")
        try:
            async with EvaluationClient(self.options.evaluation_addr, timeout=30,
                                        credentials=self.options.credentials) as client:
                await client.create_evaluation(epb.Evaluation(spec=spec), validate_only=True)
        except DomainError as err:
            message = err.message.replace("spec.benchmarks", "spec.eval_after.benchmarks")
            raise type(err)(f"spec.eval_after: {message}", reason=err.reason, violations=[
                FieldViolation(v.field.replace("spec.benchmarks", "spec.eval_after.benchmarks"), v.description)
                for v in err.violations]) from None
        return {"benchmarks": [n.removeprefix("benchmarks/") for n in ea["benchmarks"]],
                "limit": int(ea.get("limit") or 0), "num_fewshot": ea.get("num_fewshot"),
                "include_base": bool(ea.get("include_base"))}

    # ------------------------------------------------------------------ registry inputs

    async def _base_model(self, name: str, field_name: str) -> ModelVersionInfo:
        base = await self.model_version(name, field_name)
        if base.kind not in ("base", "merged"):
            raise InvalidArgument.for_field(field_name, f"{name} is a {base.kind} version; train from a base or merged "
                                            "model", reason="NOT_A_BASE_MODEL")
        return base

    async def model_version(self, name: str, field_name: str) -> ModelVersionInfo:
        """A READY registry model version, errors naming ``field_name``."""
        return await ready_model_version(self.registry, name, field_name)

    async def _dataset(self, name: str, field_name: str, method: str) -> DatasetVersionInfo:
        try:
            info = DatasetVersionInfo.of(await self.registry.get_dataset_version(name))
        except DomainError as err:
            raise naming(err, field_name) from None
        allowed = METHOD_FORMATS[method]
        if info.format not in allowed:
            raise InvalidArgument(
                f"{field_name}: {name} is a {info.format} dataset; method {method} trains on {' or '.join(allowed)} data",
                reason="DATASET_FORMAT_MISMATCH", metadata={"dataset": name, "format": info.format, "method": method},
                violations=[FieldViolation(field_name, f"format {info.format} does not fit method {method}")])
        return info

    async def _check_rows(self, datasets: list[DatasetVersionInfo], validation: DatasetVersionInfo | None) -> None:
        """Every row of every dataset must be valid: one refusal listing the bad rows of all of them."""
        targets = [(f"datasets[{i}]", d) for i, d in enumerate(datasets)]
        if validation:
            targets.append(("validation_dataset", validation))
        violations: list[FieldViolation] = []
        for prefix, info in targets:
            problems = (await self.registry.validate_dataset(info.name, expected_format=info.format)).errors
            for p in problems:
                path = f"{prefix}.rows[{p.row}]" + (f".{p.field}" if p.field else "")
                violations.append(FieldViolation(path, f"{info.name} row {p.row}: {p.reason}"))
        if violations:
            shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
            more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
            raise InvalidArgument(f"{len(violations)} invalid dataset row(s): {shown}{more}",
                                  reason="DATASET_INVALID_ROWS", violations=violations[:MAX_ROW_VIOLATIONS],
                                  metadata={"invalid_rows": str(len(violations))})

    @staticmethod
    def _dataset_ref(d: DatasetVersionInfo) -> dict[str, Any]:
        return {"name": d.name, "key": d.key, "sha256": d.sha256, "format": d.format, "file_type": file_type_of(d.filename)}

    async def _file_json(self, base: ModelVersionInfo, path: str) -> dict[str, Any]:
        """A JSON file of the version (in S3); {} when the version has none."""
        if not any(f["path"] == path for f in base.files):
            return {}
        return json.loads(await asyncio.to_thread(self.store.get_bytes, f"{base.artifact_prefix}/files/{path}"))

    async def _config(self, base: ModelVersionInfo) -> dict[str, Any]:
        return await self._file_json(base, "config.json")

    @staticmethod
    def _shape(base: ModelVersionInfo, config: dict[str, Any]) -> ModelShape:
        """Layer sizes from the version's config.json; the parameter count from registry metadata."""
        params = base.parameter_count or sum(f["size"] for f in base.files if f["path"].endswith(".safetensors")) // 2
        return ModelShape.from_config(config, params)

    async def _image_patches(self, base: ModelVersionInfo, config: dict[str, Any], max_images: int) -> int:
        """Vision patches of a sample with ``max_images`` images, each of the image processor's largest size
        (at most a megapixel: larger limits, such as Qwen2-VL's 12.8 MP, are far above the images of a typical
        dataset)."""
        pre = await self._file_json(base, "preprocessor_config.json")
        size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
        pixels = pre.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        if not pixels and size.get("height") and size.get("width"):
            pixels = size["height"] * size["width"]
        pixels = min(int(pixels or IMAGE_PIXELS_CAP), IMAGE_PIXELS_CAP)
        patch = int((config.get("vision_config") or {}).get("patch_size") or pre.get("patch_size") or 14)
        return max_images * max(1, pixels // (patch * patch))

    @staticmethod
    def _check_vision(req: TrainingRequest, hp: Hyperparameters, vision: bool) -> None:
        """A text-only model refuses the vision hyperparameters set to other than their defaults; a
        vision-language model refuses the methods its recipe does not run (preference methods, QLoRA)."""
        if vision:
            if req.method in PREFERENCE_METHODS or req.method == "qlora":
                raise InvalidArgument.for_field(
                    "spec.method", f"{req.method} is not supported for a vision-language base model "
                    f"({req.base_model_version}); use lora, dora or full", reason="METHOD_UNSUPPORTED_FOR_VLM")
            return
        given = req.hyperparameters
        defaults = {"freeze_vision_tower": True, "freeze_aligner": True, "vision_learning_rate": hp.learning_rate,
                    "aligner_learning_rate": hp.learning_rate,
                    "max_images_per_sample": Hyperparameters.model_fields["max_images_per_sample"].default}
        violations = [FieldViolation(f"spec.hyperparameters.{name}", f"applies to vision-language models only; "
                                     f"{req.base_model_version} is a text-only model")
                      for name in VISION_HYPERPARAMETERS if given.get(name) is not None and given[name] != defaults[name]]
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations),
                                  reason="VISION_HYPERPARAMETERS_ON_TEXT_MODEL", violations=violations)

    # ------------------------------------------------------------------ hardware and memory

    def _processes(self, req: TrainingRequest) -> int:
        hw, launcher = self.hardware, req.launcher
        on_gpu = hw.accelerator in ("cuda", "npu")
        wanted = launcher.num_processes or (hw.device_count if on_gpu else 1)
        if launcher.kind == "local":
            return 1
        if launcher.kind == "deepspeed" and not hw.deepspeed:
            # Without GPUs DeepSpeed runs on its CPU accelerator over gloo (fp32; checked by the recipe).
            raise _unsupported("launcher deepspeed needs the deepspeed package, which this node lacks",
                               launcher="deepspeed")
        allowed = self.options.max_processes or (hw.device_count if on_gpu else hw.cpu_cores)
        if wanted > allowed:
            raise _unsupported(f"launcher {launcher.kind} asks for {wanted} processes; this node allows {allowed} "
                               f"({hw.device_count} {hw.accelerator} device(s), {hw.cpu_cores} CPU cores)",
                               launcher=launcher.kind, num_processes=str(wanted), allowed=str(allowed))
        return wanted

    def _precision(self, req: TrainingRequest) -> str:
        hw = self.hardware
        if req.method == "qlora" and not (hw.accelerator == "cuda" and hw.bitsandbytes):
            missing = [] if hw.accelerator == "cuda" else [f"a CUDA GPU (this node: {hw.accelerator})"]
            missing += [] if hw.bitsandbytes else ["bitsandbytes"]
            raise _unsupported(f"qlora needs a CUDA GPU with bitsandbytes; missing: {', '.join(missing)}",
                               method="qlora", accelerator=hw.accelerator)
        precision = choose_precision(req.hyperparameters.get("precision") or "auto", hw)
        if precision == "fp16" and hw.accelerator not in ("cuda", "npu"):
            raise _unsupported(f"precision fp16 needs a CUDA or NPU device (this node: {hw.accelerator}); use fp32 or bf16",
                               precision="fp16", accelerator=hw.accelerator)
        if precision == "bf16" and hw.accelerator == "cuda" and not hw.supports_bf16():
            raise _unsupported("precision bf16 needs CUDA compute capability >= 8.0 (Ampere); use fp16",
                               precision="bf16", accelerator=hw.accelerator)
        return precision

    def _check_memory(self, estimate: MemoryEstimate, processes: int, req: TrainingRequest) -> int:
        """Bytes available per process; ResourceExhausted when the estimate does not fit."""
        hw = self.hardware
        if hw.devices:
            available = min(d.free_memory_bytes for d in hw.devices[:processes])
            where = f"{hw.accelerator} device memory free per device"
        else:
            available = hw.ram_available_bytes // max(1, processes)
            where = "RAM available" + (f" per process ({processes} processes)" if processes > 1 else "")
        budget = int(available * self.options.memory_headroom)
        if self.options.memory_check and estimate.total > budget:
            raise ResourceExhausted(
                f"job needs about {gib(estimate.total)} per process ({estimate.describe()}) but {where} is "
                f"{gib(available)} (budget {gib(budget)} at headroom {self.options.memory_headroom:g}); lower "
                "batch_size or max_length, use LoRA/QLoRA, gradient checkpointing or ZeRO across more processes",
                reason="INSUFFICIENT_MEMORY",
                metadata={"estimated_bytes": str(estimate.total), "available_bytes": str(available),
                          "accelerator": hw.accelerator, "method": req.method})
        return available


def _unsupported(message: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason=HARDWARE_UNSUPPORTED, metadata=metadata)
