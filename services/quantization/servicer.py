"""gRPC servicer of QuantizationService: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.quantization.v1 import quantization_pb2 as pb
from modelyard.quantization.v1 import quantization_pb2_grpc
from services.core.jobs import JobRecord
from services.core.jobs.protos import events_to_proto, job_fields

from .domain import QuantizationJobs
from .methods import PROTO_METHODS
from .preflight import QuantizationRequest

_METHOD_NAMES = {v: k for k, v in PROTO_METHODS.items()}


def _enum(enum: Any, value: int, prefix: str) -> str:
    return "" if value == 0 else enum.Name(value).removeprefix(prefix).lower()


def request_from_proto(request: pb.CreateQuantizationJobRequest) -> QuantizationRequest:
    job, spec = request.quantization_job, request.quantization_job.spec
    method = PROTO_METHODS.get(pb.QuantizationMethod.Name(spec.method).removeprefix("QUANTIZATION_METHOD_"), "")
    return QuantizationRequest(
        source_model_version=spec.source_model_version,
        method=method,
        bits=spec.bits,
        group_size=spec.group_size,
        calibration_dataset_version=spec.calibration_dataset_version,
        calibration_samples=spec.calibration_samples,
        calibration_max_length=spec.calibration_max_length,
        output_model=spec.output_model,
        backend=_enum(pb.QuantizationBackend, spec.backend, "QUANTIZATION_BACKEND_"),
        merge_adapter=spec.merge_adapter,
        display_name=job.display_name,
        job_id=request.quantization_job_id,
    )


def _spec_to_proto(s: dict[str, Any]) -> pb.QuantizationJobSpec:
    source = (s.get("adapter") or {}).get("name") or s["source"]["name"]
    calibration = s.get("calibration") or {}
    return pb.QuantizationJobSpec(
        source_model_version=source,
        method=pb.QuantizationMethod.Value(f"QUANTIZATION_METHOD_{_METHOD_NAMES[s['method']]}"),
        bits=s["bits"],
        group_size=s["group_size"],
        calibration_dataset_version=(calibration.get("dataset") or {}).get("name", ""),
        calibration_samples=calibration.get("samples", 0),
        calibration_max_length=calibration.get("max_length", 0),
        output_model=s["output"]["model"],
        backend=pb.QuantizationBackend.Value(f"QUANTIZATION_BACKEND_{s['backend'].upper()}"),
        merge_adapter=bool(s.get("adapter")),
    )


def job_to_proto(job: JobRecord) -> pb.QuantizationJob:
    out = job.outputs or {}
    quality = out.get("quality") or {}
    outputs = pb.QuantizationJobOutputs(
        model_version=out.get("model_version", ""),
        size_bytes=out.get("size_bytes", 0),
        source_size_bytes=out.get("source_size_bytes", 0),
        merged_model_version=out.get("merged_model_version", ""),
        unquantized_layers=out.get("unquantized_layers", []),
        library_versions=out.get("library_versions", {}),
        format=out.get("format", ""),
        verified_with=out.get("verified_with", ""),
    )
    if quality:
        outputs.quality.CopyFrom(
            pb.QuantizationQuality(
                source_perplexity=quality.get("source_perplexity", 0.0),
                quantized_perplexity=quality.get("quantized_perplexity", 0.0),
                top1_agreement=quality.get("top1_agreement", 0.0),
                eval_tokens=quality.get("eval_tokens", 0),
            )
        )
    msg = pb.QuantizationJob(
        **job_fields(job),
        outputs=outputs,
        display_name=job.spec.get("output", {}).get("description", ""),
        spec=_spec_to_proto(job.spec),
    )
    summary = job.spec.get("preflight") or {}
    if summary:
        msg.preflight.CopyFrom(
            pb.QuantizationPreflight(
                accelerator=summary["accelerator"],
                estimated_memory_bytes=summary["estimated_memory_bytes"],
                available_memory_bytes=summary["available_memory_bytes"],
                parameter_count=summary["parameter_count"],
                source_size_bytes=summary["source_size_bytes"],
                expected_size_bytes=summary["expected_size_bytes"],
                unquantized_layers=summary["unquantized_layers"],
                format=summary["format"],
                verify_engine="vllm" if job.spec.get("verify_with_vllm") else "transformers",
            )
        )
    return msg


class QuantizationServicer(quantization_pb2_grpc.QuantizationServiceServicer):
    def __init__(self, jobs: QuantizationJobs) -> None:
        self._jobs = jobs

    async def CreateQuantizationJob(self, request, context):
        job = job_to_proto(await self._jobs.create(request_from_proto(request), validate_only=request.validate_only))
        if request.validate_only:  # the job as it would be queued: nothing was stored
            job.state = cpb.JOB_STATE_UNSPECIFIED
            job.ClearField("create_time")
        return job

    async def GetQuantizationJob(self, request, context):
        return job_to_proto(await self._jobs.get(request.name))

    async def ListQuantizationJobs(self, request, context):
        page = await self._jobs.list(
            filter=request.filter, order_by=request.order_by, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListQuantizationJobsResponse(
            quantization_jobs=[job_to_proto(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelQuantizationJob(self, request, context):
        return job_to_proto(await self._jobs.cancel(request.name))

    async def WatchQuantizationJob(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        async for event in events_to_proto(self._jobs.watch(request.name, request.after_sequence)):
            yield event
