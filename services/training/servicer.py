"""gRPC servicer of TrainingService: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.training.v1 import training_pb2 as pb
from modelyard.training.v1 import training_pb2_grpc
from services.core.jobs import EventType, JobEvent, JobRecord, JobState
from services.core.jobs.records import error_to_domain
from services.core.status import to_status_proto

from .domain import KIND_MERGE, Checkpoint, TrainingJobs
from .spec import LauncherRequest, TrainingRequest

_STATES = {s: getattr(cpb, f"JOB_STATE_{s.value}") for s in JobState}
_PRECISIONS = {"bf16": pb.PRECISION_BF16, "fp16": pb.PRECISION_FP16, "fp32": pb.PRECISION_FP32}
_LAUNCHERS = {"local": pb.LAUNCHER_TYPE_LOCAL, "torchrun": pb.LAUNCHER_TYPE_TORCHRUN,
              "deepspeed": pb.LAUNCHER_TYPE_DEEPSPEED}
_OPTIONAL_HP = ("lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "warmup_ratio", "weight_decay",
                "max_grad_norm", "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "max_length",
                "seed", "packing", "gradient_checkpointing", "beta", "simpo_gamma", "validation_split")
# Progress events go out as JobMetrics with these value names.
PROGRESS_KEYS = {"fraction": "progress_fraction", "total_steps": "total_steps", "eta_s": "eta_seconds"}


def _enum_value(enum: Any, value: int, prefix: str) -> str:
    return "" if value == 0 else enum.Name(value).removeprefix(prefix).lower()


def request_from_proto(request: pb.CreateTrainingJobRequest) -> TrainingRequest:
    job, spec = request.training_job, request.training_job.spec
    hp_msg = spec.hyperparameters
    hp: dict[str, Any] = {f: getattr(hp_msg, f) for f in _OPTIONAL_HP if hp_msg.HasField(f)}
    if hp_msg.target_modules:
        hp["lora_target_modules"] = list(hp_msg.target_modules)
    if hp_msg.lr_scheduler:
        hp["lr_scheduler"] = _enum_value(pb.LrScheduler, hp_msg.lr_scheduler, "LR_SCHEDULER_")
    if hp_msg.precision:
        hp["precision"] = _enum_value(pb.Precision, hp_msg.precision, "PRECISION_")
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
        full_weights=spec.full_weights, display_name=job.display_name, job_id=request.training_job_id)


def _ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def _spec_to_proto(job: JobRecord) -> pb.TrainingJobSpec:
    s = job.spec
    if job.kind == KIND_MERGE:
        return pb.TrainingJobSpec(base_model_version=s["base_model"]["name"], output_model=s["output"]["model"],
                                  dataset_versions=s.get("dataset_versions", []))
    hp, launcher = s["hyperparameters"], s["launcher"]
    targets = hp["lora_target_modules"]
    return pb.TrainingJobSpec(
        base_model_version=s["base_model"]["name"],
        dataset_versions=[d["name"] for d in s["datasets"]],
        validation_dataset_version=(s.get("validation_dataset") or {}).get("name", ""),
        method=pb.TrainingMethod.Value(f"TRAINING_METHOD_{s['method'].upper()}"),
        hyperparameters=pb.Hyperparameters(
            lora_rank=hp["lora_rank"], lora_alpha=int(hp["lora_alpha"]), lora_dropout=hp["lora_dropout"],
            target_modules=[targets] if isinstance(targets, str) else targets, learning_rate=hp["learning_rate"],
            lr_scheduler=pb.LrScheduler.Value(f"LR_SCHEDULER_{hp['lr_scheduler'].upper()}"),
            warmup_ratio=hp["warmup_ratio"], weight_decay=hp["weight_decay"], max_grad_norm=hp["max_grad_norm"],
            num_epochs=hp["num_epochs"], max_steps=hp["max_steps"], batch_size=hp["batch_size"],
            gradient_accumulation_steps=hp["gradient_accumulation_steps"], max_length=hp["max_length"],
            seed=hp["seed"], packing=hp["packing"], precision=_PRECISIONS[hp["precision"]],
            gradient_checkpointing=hp.get("gradient_checkpointing", True), beta=hp["beta"],
            simpo_gamma=hp.get("simpo_gamma", 1.0), validation_split=s.get("validation_split", 0.0)),
        launcher=pb.Launcher(type=_LAUNCHERS[launcher["kind"]], num_processes=launcher["num_processes"],
                             zero_stage=launcher["zero_stage"], offload_optimizer=launcher["offload"],
                             offload_parameters=launcher.get("offload_parameters", False)),
        checkpoint_every_steps=s["checkpoint_every_steps"], eval_every_steps=s["eval_every_steps"],
        log_every_steps=s["log_every_steps"], output_model=s["output"]["model"], merge_adapter=s["output"]["merge"],
        full_weights=not s["use_lora"] and s["method"] not in ("full",),
    )


def job_to_proto(job: JobRecord) -> pb.TrainingJob:
    p = job.progress or {}
    progress = cpb.JobProgress(fraction=p.get("fraction") or 0.0, step=p.get("step") or 0,
                               total_steps=p.get("total_steps") or 0,
                               metrics={k: float(v) for k, v in (p.get("metrics") or {}).items()
                                        if isinstance(v, int | float)})
    if p.get("eta_s") is not None:
        progress.eta.CopyFrom(duration_pb2.Duration(seconds=int(p["eta_s"])))
    out = job.outputs or {}
    model_version = out.get("adapter_version") or out.get("merged_version") if job.kind != KIND_MERGE else ""
    merged = out.get("merged_version") if (out.get("adapter_version") or job.kind == KIND_MERGE) else ""
    outputs = pb.TrainingJobOutputs(
        model_version=model_version or "", merged_model_version=merged or "",
        final_metrics={k: float(v) for k, v in (out.get("final_metrics") or {}).items() if isinstance(v, int | float)},
        checkpoint_count=len(out.get("checkpoints") or []))
    summary = job.spec.get("preflight") or {}
    msg = pb.TrainingJob(
        name=job.name, state=_STATES[job.state], progress=progress, create_time=_ts(job.created_at),
        start_time=_ts(job.started_at), end_time=_ts(job.finished_at), attempt_count=job.attempt if job.started_at else 0,
        outputs=outputs, display_name=job.spec.get("output", {}).get("description", ""), spec=_spec_to_proto(job),
        kind=pb.TRAINING_JOB_KIND_MERGE if job.kind == KIND_MERGE else pb.TRAINING_JOB_KIND_TRAIN,
    )
    if summary:
        msg.preflight.CopyFrom(pb.Preflight(
            accelerator=summary["accelerator"], precision=_PRECISIONS[summary["precision"]],
            estimated_memory_bytes=summary["estimated_memory_bytes"],
            available_memory_bytes=summary["available_memory_bytes"], parameter_count=summary["parameter_count"],
            trainable_parameter_count=summary["trainable_parameter_count"]))
    err = job.domain_error()
    if err is not None:
        msg.error.CopyFrom(to_status_proto(err))
    return msg


def event_to_proto(event: JobEvent, previous: JobState | None) -> cpb.JobEvent:
    """A stored event as a common JobEvent (progress events become JobMetrics, see PROGRESS_KEYS)."""
    msg = cpb.JobEvent(sequence=event.seq, time=_ts(event.time))
    data = event.data or {}
    if event.type == EventType.STATE:
        state = JobState(data["state"])
        change = cpb.JobStateChange(previous_state=_STATES[previous] if previous else cpb.JOB_STATE_UNSPECIFIED,
                                    state=_STATES[state])
        if data.get("error"):
            change.error.CopyFrom(to_status_proto(error_to_domain(data["error"])))
        msg.state_change.CopyFrom(change)
    elif event.type == EventType.METRICS:
        msg.metrics.CopyFrom(cpb.JobMetrics(step=data.get("step") or 0, values={
            k: float(v) for k, v in data.items() if k != "step" and isinstance(v, int | float)}))
    elif event.type == EventType.PROGRESS:
        msg.metrics.CopyFrom(cpb.JobMetrics(step=data.get("step") or 0, values={
            PROGRESS_KEYS[k]: float(v) for k, v in data.items() if k in PROGRESS_KEYS and v is not None}))
    else:
        fields = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("stream", "traceback"))
        msg.log.CopyFrom(cpb.JobLogLine(line=f"{event.message} {fields}".rstrip()))
    return msg


def checkpoint_to_proto(c: Checkpoint) -> pb.Checkpoint:
    return pb.Checkpoint(name=c.name, step=c.step, create_time=_ts(c.create_time), artifact_prefix=c.artifact_prefix,
                         size_bytes=c.size_bytes, metrics=c.metrics)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: TrainingJobs) -> None:
        self._jobs = jobs

    async def CreateTrainingJob(self, request, context):
        return job_to_proto(await self._jobs.create(request_from_proto(request)))

    async def GetTrainingJob(self, request, context):
        return job_to_proto(await self._jobs.get(request.name))

    async def ListTrainingJobs(self, request, context):
        jobs, token = await self._jobs.list(filter=request.filter, order_by=request.order_by,
                                            page_size=request.page_size, page_token=request.page_token)
        return pb.ListTrainingJobsResponse(training_jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    async def CancelTrainingJob(self, request, context):
        return job_to_proto(await self._jobs.cancel(request.name))

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        previous: JobState | None = None
        async for event in self._jobs.watch(request.name, request.after_sequence):
            yield event_to_proto(event, previous)
            if event.type == EventType.STATE:
                previous = JobState(event.data["state"])

    async def ListCheckpoints(self, request, context):
        found, token = await self._jobs.checkpoints(request.parent, filter=request.filter, order_by=request.order_by,
                                                    page_size=request.page_size, page_token=request.page_token)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_proto(c) for c in found], next_page_token=token)

    async def MergeAdapter(self, request, context):
        job = await self._jobs.merge(request.adapter_version, output_model=request.output_model,
                                     job_id_=request.training_job_id, display_name=request.display_name)
        return pb.MergeAdapterResponse(training_job=job_to_proto(job))

