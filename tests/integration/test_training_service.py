"""The training service through real gRPC: in-process registry and training servers on port 0, a real
nanio S3 server, real SQLite, job children running the real recipes on the tiny model (CPU)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from cli.demo_models import build_tiny_model
from cli.training_cmds import jobs_app, train_app
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.training.v1 import training_pb2 as tpb
from tests.support.training_stack import (
    import_model,
    lora_job,
    rpc_error,
    training_stack,
    upload_dataset,
    wait_state,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def bad_rows_file(tmp_path: Path) -> Path:
    """Ten chat rows; row 4 has a numeric answer and row 8 an unknown role."""
    lines = (DATA / "training" / "shout_train.jsonl").read_text().splitlines()[:10]
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]})
    lines[7] = json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _drain(stream) -> list:
    return [e async for e in stream]


async def _inputs(stack, tiny_model: Path) -> tuple[str, str]:
    base = await import_model(stack.registry, tiny_model)
    chat = await upload_dataset(stack.registry, "datasets/shout", DATA / "training" / "shout_train.jsonl")
    return base, chat


async def test_preflight_refuses_bad_jobs_with_clear_errors_and_queues_nothing(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings) as stack:
        base, chat = await _inputs(stack, tiny_model)
        bad = await upload_dataset(stack.registry, "datasets/bad", bad_rows_file(tmp_path))
        create = stack.training.CreateTrainingJob

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(
            training_job=lora_job("models/nope/versions/v1", [chat]))))
        assert code == grpc.StatusCode.NOT_FOUND
        assert err.message.startswith("spec.base_model_version:") and "models/nope/versions/v1" in err.message

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(training_job=lora_job(base, [chat, bad]))))
        assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID_ROWS")
        fields = [v.field for v in err.violations]
        assert {f.split(".")[1] for f in fields} == {"rows[4]", "rows[8]"}
        assert all(f.startswith("datasets[1].rows[") for f in fields), fields
        assert any(f.startswith("datasets[1].rows[4].messages[1].content") for f in fields), fields

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(
            training_job=lora_job(base, [chat], method=tpb.TRAINING_METHOD_DPO))))
        assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_FORMAT_MISMATCH")
        assert err.violations[0].field == "spec.dataset_versions[0]" and "preference" in err.message

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(
            training_job=lora_job(base, [chat], method=tpb.TRAINING_METHOD_QLORA))))
        assert (code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "HARDWARE_UNSUPPORTED")
        assert "qlora needs a CUDA GPU" in err.message

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(training_job=lora_job(
            base, [chat], hyperparameters={"max_length": 1_000_000, "batch_size": 256}))))
        assert (code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_MEMORY")
        assert "GiB" in err.message and "RAM available" in err.message
        assert int(err.metadata["estimated_bytes"]) > int(err.metadata["available_bytes"]) > 0

        code, err = await rpc_error(create(tpb.CreateTrainingJobRequest(training_job=lora_job(
            base, [chat], hyperparameters={"learning_rate": -1.0, "lora_dropout": 1.5}))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in err.violations} == {"spec.hyperparameters.learning_rate",
                                                     "spec.hyperparameters.lora_dropout"}

        listed = await stack.training.ListTrainingJobs(tpb.ListTrainingJobsRequest())
        assert list(listed.training_jobs) == []


async def test_lora_sft_job_streams_loss_live_and_registers_an_adapter_with_lineage(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings) as stack:
        base, chat = await _inputs(stack, tiny_model)
        job = await stack.training.CreateTrainingJob(tpb.CreateTrainingJobRequest(
            training_job=lora_job(base, [chat], checkpoint_every_steps=2, output_model="models/tiny-shout"),
            training_job_id="shout-lora"))
        assert (job.name, job.state, job.kind) == ("trainingJobs/shout-lora", cpb.JOB_STATE_QUEUED,
                                                   tpb.TRAINING_JOB_KIND_TRAIN)
        hp = job.spec.hyperparameters
        assert (hp.lora_alpha, hp.lora_dropout, list(hp.target_modules), hp.lr_scheduler, hp.warmup_ratio) == (
            32, 0.05, ["all-linear"], tpb.LR_SCHEDULER_COSINE, 0.05)
        assert job.preflight.accelerator == "cpu" and job.preflight.precision == tpb.PRECISION_FP32
        assert 0 < job.preflight.trainable_parameter_count < job.preflight.parameter_count

        losses, states, seen_running_loss = [], [], False
        async for event in stack.training.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name), timeout=240):
            which = event.WhichOneof("payload")
            if which == "metrics" and "loss" in event.metrics.values:
                losses.append((event.metrics.step, event.metrics.values["loss"]))
                if not seen_running_loss:  # the stream is live: the job is still running when loss arrives
                    now = await stack.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name))
                    seen_running_loss = now.state == cpb.JOB_STATE_RUNNING
            elif which == "state_change":
                states.append(event.state_change.state)
        assert states[0] == cpb.JOB_STATE_QUEUED and states[-1] == cpb.JOB_STATE_SUCCEEDED, states
        assert [s for s, _ in losses] == [1, 2, 3, 4] and seen_running_loss

        done = await stack.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name))
        assert done.state == cpb.JOB_STATE_SUCCEEDED and done.attempt_count == 1
        assert done.progress.fraction == 1.0 and done.progress.step == 4
        adapter = (await stack.registry.GetModelVersion(rpb.GetModelVersionRequest(
            name=done.outputs.model_version))).model_version
        assert adapter.name.startswith("models/tiny-shout/versions/") and adapter.kind == rpb.MODEL_KIND_ADAPTER
        assert adapter.lineage.base_model_version == base and list(adapter.lineage.dataset_versions) == [chat]
        assert adapter.lineage.job == job.name

        checkpoints = (await stack.training.ListCheckpoints(tpb.ListCheckpointsRequest(parent=job.name))).checkpoints
        assert [c.step for c in checkpoints] == [2, 4]
        assert checkpoints[0].name == "trainingJobs/shout-lora/checkpoints/step-00000002"
        assert checkpoints[0].size_bytes > 0 and "loss" in checkpoints[0].metrics
        later = await stack.training.ListCheckpoints(tpb.ListCheckpointsRequest(parent=job.name, filter="step > 2"))
        assert [c.step for c in later.checkpoints] == [4]

        # Watch again from the middle: only the later events, and the stream ends.
        replay = [e async for e in stack.training.WatchTrainingJob(
            tpb.WatchTrainingJobRequest(name=job.name, after_sequence=5))]
        assert replay[0].sequence == 6 and replay[-1].state_change.state == cpb.JOB_STATE_SUCCEEDED

        code, err = await rpc_error(stack.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name)))
        assert (code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_ALREADY_FINISHED")

        watched = await asyncio.to_thread(CliRunner().invoke, jobs_app, ["watch", "shout-lora"],
                                          env={"YARD_TRAINING_ADDR": stack.training_addr})
        assert watched.exit_code == 0, watched.output
        assert f"model version: {adapter.name}" in watched.output and "4/4" in watched.output

        # Merge the registered adapter in a merge job; the merged version derives from the adapter.
        code, err = await rpc_error(stack.training.MergeAdapter(tpb.MergeAdapterRequest(adapter_version=base)))
        assert (code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_AN_ADAPTER")
        merge = (await stack.training.MergeAdapter(tpb.MergeAdapterRequest(
            adapter_version=adapter.name, output_model="models/tiny-shout-merged"))).training_job
        assert merge.kind == tpb.TRAINING_JOB_KIND_MERGE and merge.spec.base_model_version == base
        merged_job = await wait_state(stack.training, merge.name, TERMINAL, timeout=120)
        assert merged_job.state == cpb.JOB_STATE_SUCCEEDED, merged_job.error
        merged = (await stack.registry.GetModelVersion(rpb.GetModelVersionRequest(
            name=merged_job.outputs.merged_model_version))).model_version
        assert merged.kind == rpb.MODEL_KIND_MERGED and merged.lineage.base_model_version == adapter.name
        assert merged.name.startswith("models/tiny-shout-merged/versions/") and merged.lineage.job == merge.name


async def test_cancel_stops_a_running_job(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings) as stack:
        base, chat = await _inputs(stack, tiny_model)
        job = await stack.training.CreateTrainingJob(tpb.CreateTrainingJobRequest(
            training_job=lora_job(base, [chat], hyperparameters={"max_steps": 100_000})))
        async for event in stack.training.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name), timeout=120):
            if event.WhichOneof("payload") == "metrics" and "loss" in event.metrics.values:
                break  # training is under way
        await stack.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name))
        done = await wait_state(stack.training, job.name, TERMINAL, timeout=60)
        assert done.state == cpb.JOB_STATE_CANCELLED and done.end_time.seconds > 0
        assert 0 < done.progress.step < 100_000


async def test_list_pages_filters_and_cli_shows_jobs(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings, worker=False) as stack:  # an API-only replica: jobs stay QUEUED
        base, chat = await _inputs(stack, tiny_model)
        created = []
        for i, method in enumerate([tpb.TRAINING_METHOD_LORA, tpb.TRAINING_METHOD_DORA, tpb.TRAINING_METHOD_LORA]):
            job = await stack.training.CreateTrainingJob(tpb.CreateTrainingJobRequest(
                training_job=lora_job(base, [chat], method=method), training_job_id=f"job-{i}"))
            created.append(job.name)
        await stack.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name="trainingJobs/job-2"))

        names, token = [], ""
        while True:
            page = await stack.training.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=2, page_token=token,
                                                                                     order_by="create_time asc"))
            assert len(page.training_jobs) <= 2
            names += [j.name for j in page.training_jobs]
            if not (token := page.next_page_token):
                break
        assert names == created
        lora = await stack.training.ListTrainingJobs(tpb.ListTrainingJobsRequest(
            filter="method = TRAINING_METHOD_LORA AND state = JOB_STATE_QUEUED"))
        assert [j.name for j in lora.training_jobs] == ["trainingJobs/job-0"]
        code, _ = await rpc_error(_drain(stack.training.WatchTrainingJob(tpb.WatchTrainingJobRequest(
            name="trainingJobs/nope"))))
        assert code == grpc.StatusCode.NOT_FOUND
        code, err = await rpc_error(stack.training.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=-1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == "page_size"

        runner, env = CliRunner(), {"YARD_TRAINING_ADDR": stack.training_addr}
        listed = await asyncio.to_thread(runner.invoke, jobs_app, ["list"], env=env)
        assert listed.exit_code == 0, listed.output
        assert all(n.split("/")[1] in listed.output for n in created) and "cancelled" in listed.output
        shown = await asyncio.to_thread(runner.invoke, jobs_app, ["show", "job-1"], env=env)
        assert shown.exit_code == 0, shown.output
        assert "trainingJobs/job-1" in shown.output and "dora" in shown.output and base in shown.output
        missing = await asyncio.to_thread(runner.invoke, jobs_app, ["show", "nope"], env=env)
        assert missing.exit_code == 1 and "NOT_FOUND" in missing.output and "Traceback" not in missing.output

        started = await asyncio.to_thread(runner.invoke, train_app, [
            "sft", "--model", base.removeprefix("models/").replace("/versions/", "/"), "--dataset", "shout/v1",
            "--set", "max_steps=2", "--set", "launcher.type=local", "--name", "from-cli"], env=env)
        assert started.exit_code == 0, started.output
        assert "queued trainingJobs/from-cli" in started.output
        job = await stack.training.GetTrainingJob(tpb.GetTrainingJobRequest(name="trainingJobs/from-cli"))
        assert job.spec.hyperparameters.max_steps == 2 and job.spec.dataset_versions == [chat]
        refused = await asyncio.to_thread(runner.invoke, train_app, [
            "dpo", "--model", base, "--dataset", chat], env=env)
        assert refused.exit_code == 1 and "DATASET_FORMAT_MISMATCH" in refused.output
        assert "Traceback" not in refused.output
