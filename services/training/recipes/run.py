"""The ``train`` job kind: ``services.training.recipes.run:run_training``.

setup (check the node, download the base model and datasets, find the checkpoint to resume from)
-> train (here, or in ``num_processes`` ranks under torchrun with rank 0's events relayed)
-> upload the adapter / model (and the merged model) -> register them in the registry -> outputs.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.artifacts import S3ArtifactStore
from services.core.errors import Cancelled, DataLoss, DomainError, Internal, error_to_domain
from services.core.jobs.context import JobContext
from services.core.jobs.register import register_version
from services.core.jobs.secrets import s3_settings_for

from . import rank as rank_files
from .capability import check_capabilities
from .checkpoints import complete_checkpoints, download_latest, job_prefix, remove_partial
from .distributed import launch_command, launch_env
from .events import ContextSink, relay
from .merge import merge_adapter
from .spec import DatasetRef, TrainingSpec, parse_spec

if TYPE_CHECKING:
    from .train import DatasetFile, Plan, TrainResult

_RELAY_POLL_S = 0.2


def _download_dataset(store: S3ArtifactStore, ref: DatasetRef, dest_dir: Path) -> DatasetFile:
    from .train import DatasetFile

    dest = dest_dir / ref.sha256[:16] / Path(ref.key).name
    if not dest.exists():
        entry = store.get_file(ref.key, dest)
        if entry.sha256 != ref.sha256:
            dest.unlink(missing_ok=True)
            raise DataLoss(f"dataset {ref.name} ({ref.key}) has sha256 {entry.sha256}, the spec expects {ref.sha256}",
                           reason="CHECKSUM_MISMATCH", metadata={"key": ref.key, "dataset": ref.name})
    return DatasetFile(ref.name, str(dest), ref.sha256, ref.format, ref.file_type)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ctx: JobContext, spec: TrainingSpec, plan: Plan, sink: ContextSink) -> TrainResult:
    """Run ``num_processes`` ranks under torchrun; relay rank 0's events; a cancel becomes the flag file."""
    import torch

    workdir = Path(plan.workdir)
    events = workdir / rank_files.EVENTS_FILE
    for stale in (events, workdir / rank_files.RESULT_FILE, workdir / rank_files.CANCEL_FLAG):
        stale.unlink(missing_ok=True)
    events.touch()
    plan_path = workdir / "plan.json"
    plan_path.write_text(plan.to_json())
    cmd = launch_command(spec.launcher, plan_path, _free_port())
    sink.log("ranks launched", launcher=spec.launcher.kind, processes=spec.launcher.num_processes,
             zero_stage=spec.launcher.zero_stage if spec.launcher.kind == "deepspeed" else None)
    proc = subprocess.Popen(cmd, cwd=workdir, env=launch_env(workdir, spec.omp_num_threads, torch.cuda.is_available()))
    error: dict[str, Any] | None = None
    with open(events, encoding="utf-8") as stream:
        def drain() -> None:
            nonlocal error
            while line := stream.readline():
                if not line.endswith("\n"):  # a line still being written: read it whole next time
                    stream.seek(stream.tell() - len(line.encode()))
                    return
                error = relay(json.loads(line), sink) or error

        while proc.poll() is None:
            drain()
            if ctx.cancelled():
                (workdir / rank_files.CANCEL_FLAG).touch()
            time.sleep(_RELAY_POLL_S)
        drain()
    if error is not None:
        raise error_to_domain(error)
    from .train import TrainResult

    result_path = workdir / rank_files.RESULT_FILE
    if proc.returncode != 0 or not result_path.exists():
        if ctx.cancelled():
            return TrainResult(0, True, {})
        raise Internal(f"training ranks exited with code {proc.returncode} (see the job's log)",
                       reason="TRAINING_RANKS_FAILED", metadata={"exit_code": str(proc.returncode)})
    return TrainResult(**json.loads(result_path.read_text()))


def run_training(ctx: JobContext) -> dict[str, Any]:
    """Job kind entry point (see the package docstring for the spec and the outputs)."""
    spec = parse_spec(ctx.spec)
    check_capabilities(spec)  # before anything is downloaded or loaded
    from .train import Plan, train  # transformers, peft, trl: only once the node can run the job
    sink = ContextSink(ctx)
    store = S3ArtifactStore.connect(s3_settings_for(ctx.spec["s3"]))
    workdir = Path(ctx.workdir)
    base_dir = workdir / "base"
    store.download_dir(spec.base_model.artifact_prefix, base_dir)
    datasets = [_download_dataset(store, d, workdir / "data") for d in spec.datasets]
    validation = _download_dataset(store, spec.validation_dataset, workdir / "data") if spec.validation_dataset else None
    sink.log("inputs downloaded", base_model=spec.base_model.name, datasets=[d.name for d in spec.datasets])
    for stale in ("trainer", "resume", "output", "merged"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    resume_from = None
    if ctx.resume:
        remove_partial(store, ctx.name, sink.log)  # a checkpoint the previous attempt died uploading
        latest = download_latest(store, ctx.name, workdir / "resume", sink.log)
        if latest is None:
            sink.log("no complete checkpoint, training from the start", attempt=ctx.attempt)
        else:
            step, prefix, resume_dir = latest
            sink.checkpoints = [{"prefix": p, "step": n} for n, p in complete_checkpoints(store, ctx.name) if n <= step]
            sink.log("checkpoint downloaded", prefix=prefix, step=step)
            resume_from = str(resume_dir)
    output_dir = workdir / "output"
    plan = Plan(job_name=ctx.name, spec=ctx.spec, base_dir=str(base_dir), datasets=datasets, validation=validation,
                workdir=str(workdir), output_dir=str(output_dir), resume_from=resume_from)
    launched = spec.launcher.kind != "local" or spec.launcher.num_processes > 1
    result = _launch(ctx, spec, plan, sink) if launched else train(plan, sink)
    if result.cancelled or ctx.cancelled():
        raise Cancelled(f"training cancelled at step {result.global_step}; {len(sink.checkpoints)} checkpoint(s) kept",
                        reason="JOB_CANCELLED", metadata={"step": str(result.global_step)})
    return _publish(ctx, spec, store, base_dir, output_dir, result, sink)


def _publish(ctx: JobContext, spec: TrainingSpec, store: S3ArtifactStore, base_dir: Path, output_dir: Path,
             result: TrainResult, sink: ContextSink) -> dict[str, Any]:
    """Upload the trained weights (and the merged model) and register them; the job's outputs."""
    root = f"{job_prefix(ctx.name)}/outputs"
    outputs: dict[str, Any] = {"adapter_version": None, "merged_version": None, "final_metrics": result.final_metrics,
                               "checkpoints": sink.checkpoints}
    uploads: list[tuple[str, str]] = []  # (kind, prefix)
    if spec.trains_adapter:
        store.upload_dir(f"{root}/adapter", output_dir)
        uploads.append(("adapter", f"{root}/adapter"))
        if spec.output.merge:
            merged_dir = merge_adapter(base_dir, output_dir, Path(ctx.workdir) / "merged")
            store.upload_dir(f"{root}/merged", merged_dir)
            uploads.append(("merged", f"{root}/merged"))
            sink.log("adapter merged", prefix=f"{root}/merged")
    else:
        store.upload_dir(f"{root}/model", output_dir)
        uploads.append(("merged", f"{root}/model"))  # full fine-tune: complete weights, registered as MERGED
    for kind, prefix in uploads:
        outputs[f"{kind}_prefix"] = prefix
    if not spec.registry_addr:
        sink.log("registration skipped (no registry_addr)", prefixes=[p for _, p in uploads])
        return outputs
    parameters = {"method": spec.method, "use_lora": spec.trains_adapter,
                  "hyperparameters": spec.hyperparameters.model_dump(), "final_metrics": result.final_metrics}
    parent_version = spec.base_model.name
    for kind, prefix in uploads:
        name = register_version(spec.registry_addr, parent=spec.output.model, kind=kind, artifact_prefix=prefix,
                                base_model_version=parent_version, dataset_versions=[d.name for d in spec.datasets],
                                job=ctx.name, parameters=parameters, description=spec.output.description)
        outputs[f"{kind}_version"] = name
        sink.log("version registered", version=name, kind=kind)
        if kind == "adapter":
            parent_version = name  # the merged model derives from the adapter
    if spec.eval_after is not None and spec.evaluation_addr:
        target = outputs.get("merged_version") or outputs.get("adapter_version")
        try:
            outputs.update(_evaluate_after(ctx, spec, target))
        except DomainError as err:  # the trained model stays registered; the pipeline sees why no evaluation ran
            sink.log("eval_after: no evaluation queued", error=err.message)
            outputs["evaluation_error"] = err.message
    return outputs


def _evaluate_after(ctx: JobContext, spec: TrainingSpec, target: str) -> dict[str, str]:
    """Queue the ``eval_after`` evaluations (the result, and the base with ``include_base``) on the evaluation
    service; their ids derive from the job's, so a retried attempt finds them instead of queueing twice. The
    training job does not wait for them: a pipeline follows ``outputs.evaluation``."""
    import asyncio

    from modelyard.client import AlreadyExists, EvaluationClient
    from modelyard.evaluation.v1 import evaluation_pb2 as epb

    ea = spec.eval_after
    assert ea is not None
    jid = ctx.name.rsplit("/", 1)[-1]
    wanted = {"evaluation": (target, f"{jid}-after")}
    if ea.include_base:
        wanted["base_evaluation"] = (spec.base_model.name, f"{jid}-before")

    async def create() -> dict[str, str]:
        out: dict[str, str] = {}
        async with EvaluationClient(spec.evaluation_addr, timeout=60) as client:
            for key, (version, eid) in wanted.items():
                ev = epb.Evaluation(
                    display_name=f"eval_after of {ctx.name}",
                    labels={"training_job": jid},
                    spec=epb.EvaluationSpec(model_version=version, limit=ea.limit, num_fewshot=ea.num_fewshot),
                )
                for name in ea.benchmarks:
                    ev.spec.benchmarks.add(benchmark=f"benchmarks/{name}")
                try:
                    created = await client.create_evaluation(ev, evaluation_id=eid)
                    out[key] = created.name
                except AlreadyExists:
                    out[key] = f"evaluations/{eid}"
                ctx.log("evaluation queued", evaluation=out[key], model_version=version)
        return out

    return asyncio.run(create())
