"""gRPC servicer of TrainingService: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.training.v1 import training_pb2 as pb
from modelyard.training.v1 import training_pb2_grpc
from services.core.jobs import JobRecord
from services.core.jobs.protos import events_to_proto, job_fields, timestamp

from .domain import KIND_MERGE, Checkpoint, TrainingJobs
from .recipes.spec import Hyperparameters
from .spec import LauncherRequest, TrainingRequest

_PRECISIONS = {"bf16": pb.PRECISION_BF16, "fp16": pb.PRECISION_FP16, "fp32": pb.PRECISION_FP32}
_LAUNCHERS = {"local": pb.LAUNCHER_TYPE_LOCAL, "torchrun": pb.LAUNCHER_TYPE_TORCHRUN,
              "deepspeed": pb.LAUNCHER_TYPE_DEEPSPEED}
# Hyperparameters proto field -> job spec field, where the names differ; the enums' value prefixes.
_HP_SPEC_NAMES = {"target_modules": "lora_target_modules"}
_HP_PROTO_NAMES = {v: k for k, v in _HP_SPEC_NAMES.items()}
_HP_ENUMS: dict[str, tuple[Any, str]] = {"lr_scheduler": (pb.LrScheduler, "LR_SCHEDULER_"),
                                         "precision": (pb.Precision, "PRECISION_")}


def _enum_value(enum: Any, value: int, prefix: str) -> str:
    return "" if value == 0 else enum.Name(value).removeprefix(prefix).lower()


def hyperparameters_from_proto(msg: pb.Hyperparameters) -> dict[str, Any]:
    """The hyperparameters a caller set (unset optional fields, empty lists and UNSPECIFIED enums are left out:
    :meth:`Hyperparameters.resolve` gives them their defaults)."""
    given: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        name, value = _HP_SPEC_NAMES.get(fd.name, fd.name), getattr(msg, fd.name)
        if fd.name in _HP_ENUMS:
            enum, prefix = _HP_ENUMS[fd.name]
            if value:
                given[name] = _enum_value(enum, value, prefix)
        elif fd.is_repeated:
            if value:
                given[name] = list(value)
        elif msg.HasField(fd.name):
            given[name] = value
    return given


def hyperparameters_to_proto(hp: dict[str, Any], validation_split: float) -> pb.Hyperparameters:
    """A job spec's resolved hyperparameters as the proto message."""
    msg = pb.Hyperparameters(validation_split=validation_split)
    for name, value in Hyperparameters.model_validate(hp).model_dump().items():
        field = _HP_PROTO_NAMES.get(name, name)
        if field in _HP_ENUMS:
            enum, prefix = _HP_ENUMS[field]
            setattr(msg, field, enum.Value(prefix + str(value).upper()))
        elif field == "target_modules":
            msg.target_modules.extend([value] if isinstance(value, str) else value)
        else:
            setattr(msg, field, value)
    return msg


def request_from_proto(request: pb.CreateTrainingJobRequest) -> TrainingRequest:
    job, spec = request.training_job, request.training_job.spec
    hp = hyperparameters_from_proto(spec.hyperparameters)
    launcher = LauncherRequest(
        kind=_enum_value(pb.LauncherType, spec.launcher.type, "LAUNCHER_TYPE_") or "local",
        num_processes=spec.launcher.num_processes, zero_stage=spec.launcher.zero_stage,
        offload_optimizer=spec.launcher.offload_optimizer, offload_parameters=spec.launcher.offload_parameters)
    return TrainingRequest(
        base_model_version=spec.base_model_version, dataset_versions=list(spec.dataset_versions),
        method=_enum_value(pb.TrainingMethod, spec.method, "TRAINING_METHOD_"),
        validation_dataset_version=spec.validation_dataset_version, hyperparameters=hp, launcher=launcher,
        checkpoint_every_steps=spec.checkpoint_every_steps, eval_every_steps=spec.eval_every_steps,
        log_every_steps=spec.log_every_steps, output_model=spec.output_model, merge_adapter=spec.merge_adapter,
        full_weights=spec.full_weights, display_name=job.display_name, job_id=request.training_job_id,
        eval_after=_eval_after_from_proto(spec.eval_after))


def _eval_after_from_proto(ea: pb.EvalAfter) -> dict[str, Any] | None:
    if not ea.benchmarks:
        return None
    return {"benchmarks": list(ea.benchmarks), "limit": ea.limit,
            "num_fewshot": ea.num_fewshot if ea.HasField("num_fewshot") else None, "include_base": ea.include_base}


def _spec_to_proto(job: JobRecord) -> pb.TrainingJobSpec:
    s = job.spec
    if job.kind == KIND_MERGE:
        return pb.TrainingJobSpec(base_model_version=s["base_model"]["name"], output_model=s["output"]["model"],
                                  dataset_versions=s.get("dataset_versions", []))
    launcher = s["launcher"]
    return pb.TrainingJobSpec(
        base_model_version=s["base_model"]["name"],
        dataset_versions=[d["name"] for d in s["datasets"]],
        validation_dataset_version=(s.get("validation_dataset") or {}).get("name", ""),
        method=pb.TrainingMethod.Value(f"TRAINING_METHOD_{s['method'].upper()}"),
        hyperparameters=hyperparameters_to_proto(s["hyperparameters"], s.get("validation_split", 0.0)),
        launcher=pb.Launcher(type=_LAUNCHERS[launcher["kind"]], num_processes=launcher["num_processes"],
                             zero_stage=launcher["zero_stage"], offload_optimizer=launcher["offload"],
                             offload_parameters=launcher.get("offload_parameters", False)),
        checkpoint_every_steps=s["checkpoint_every_steps"], eval_every_steps=s["eval_every_steps"],
        log_every_steps=s["log_every_steps"], output_model=s["output"]["model"], merge_adapter=s["output"]["merge"],
        full_weights=not s["use_lora"] and s["method"] not in ("full",),
        eval_after=pb.EvalAfter(**s["eval_after"]) if s.get("eval_after") else None,
    )


def job_to_proto(job: JobRecord) -> pb.TrainingJob:
    out = job.outputs or {}
    model_version = out.get("adapter_version") or out.get("merged_version") if job.kind != KIND_MERGE else ""
    merged = out.get("merged_version") if (out.get("adapter_version") or job.kind == KIND_MERGE) else ""
    outputs = pb.TrainingJobOutputs(
        model_version=model_version or "", merged_model_version=merged or "",
        final_metrics={k: float(v) for k, v in (out.get("final_metrics") or {}).items() if isinstance(v, int | float)},
        checkpoint_count=len(out.get("checkpoints") or []), evaluation=out.get("evaluation") or "",
        base_evaluation=out.get("base_evaluation") or "")
    summary = job.spec.get("preflight") or {}
    msg = pb.TrainingJob(
        **job_fields(job), outputs=outputs, display_name=job.spec.get("output", {}).get("description", ""), spec=_spec_to_proto(job),
        kind=pb.TRAINING_JOB_KIND_MERGE if job.kind == KIND_MERGE else pb.TRAINING_JOB_KIND_TRAIN,
    )
    if summary:
        msg.preflight.CopyFrom(pb.Preflight(
            accelerator=summary["accelerator"], precision=_PRECISIONS[summary["precision"]],
            estimated_memory_bytes=summary["estimated_memory_bytes"],
            available_memory_bytes=summary["available_memory_bytes"], parameter_count=summary["parameter_count"],
            trainable_parameter_count=summary["trainable_parameter_count"]))
    return msg


def checkpoint_to_proto(c: Checkpoint) -> pb.Checkpoint:
    return pb.Checkpoint(name=c.name, step=c.step, create_time=timestamp(c.create_time), artifact_prefix=c.artifact_prefix,
                         size_bytes=c.size_bytes, metrics=c.metrics)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: TrainingJobs) -> None:
        self._jobs = jobs

    async def CreateTrainingJob(self, request, context):
        job = job_to_proto(await self._jobs.create(request_from_proto(request), validate_only=request.validate_only))
        if request.validate_only:  # the job as it would be queued: nothing was stored
            job.state = cpb.JOB_STATE_UNSPECIFIED
            job.ClearField("create_time")
        return job

    async def GetTrainingJob(self, request, context):
        return job_to_proto(await self._jobs.get(request.name))

    async def ListTrainingJobs(self, request, context):
        page = await self._jobs.list(filter=request.filter, order_by=request.order_by, page_size=request.page_size,
                                     page_token=request.page_token)
        return pb.ListTrainingJobsResponse(training_jobs=[job_to_proto(j) for j in page.items],
                                           next_page_token=page.next_page_token)

    async def CancelTrainingJob(self, request, context):
        return job_to_proto(await self._jobs.cancel(request.name))

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        async for event in events_to_proto(self._jobs.watch(request.name, request.after_sequence)):
            yield event

    async def ListCheckpoints(self, request, context):
        page = await self._jobs.checkpoints(request.parent, filter=request.filter, order_by=request.order_by,
                                            page_size=request.page_size, page_token=request.page_token)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_proto(c) for c in page.items],
                                          next_page_token=page.next_page_token)

    async def MergeAdapter(self, request, context):
        job = await self._jobs.merge(request.adapter_version, output_model=request.output_model,
                                     job_id_=request.training_job_id, display_name=request.display_name)
        return pb.MergeAdapterResponse(training_job=job_to_proto(job))

