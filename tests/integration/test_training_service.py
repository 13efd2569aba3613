"""The training service through real gRPC: in-process registry and training servers on port 0, a real
nanio S3 server, real SQLite (and PostgreSQL: the tests taking ``db_backend``), job children running the real
recipes on the tiny model (CPU)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.demo_models import build_tiny_model
from cli.output import to_dict
from cli.training_cmds import _value_text, jobs_app, train_app
from modelyard.client import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.training.v1 import training_pb2 as tpb
from services.training.recipes.spec import parse_spec
from tests.support.training_stack import (
    fails,
    import_model,
    lora_job,
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
        create = stack.training.create_training_job

        err = await fails(create(lora_job("models/nope/versions/v1", [chat])), NotFound)
        assert err.message.startswith("spec.base_model_version:") and "models/nope/versions/v1" in err.message

        err = await fails(create(lora_job(base, [chat, bad])), InvalidArgument)
        assert err.reason == "DATASET_INVALID_ROWS"
        fields = [v.field for v in err.violations]
        assert {f.split(".")[1] for f in fields} == {"rows[4]", "rows[8]"}
        assert all(f.startswith("datasets[1].rows[") for f in fields), fields
        assert any(f.startswith("datasets[1].rows[4].messages[1].content") for f in fields), fields

        err = await fails(create(lora_job(base, [chat], method=tpb.TRAINING_METHOD_DPO)), InvalidArgument)
        assert err.reason == "DATASET_FORMAT_MISMATCH"
        assert err.violations[0].field == "spec.dataset_versions[0]" and "preference" in err.message

        err = await fails(create(lora_job(base, [chat], method=tpb.TRAINING_METHOD_QLORA)), FailedPrecondition)
        assert err.reason == "HARDWARE_UNSUPPORTED"
        assert "qlora needs a CUDA GPU" in err.message

        err = await fails(create(lora_job(
            base, [chat], hyperparameters={"max_length": 1_000_000, "batch_size": 256})), ResourceExhausted)
        assert err.reason == "INSUFFICIENT_MEMORY"
        assert "GiB" in err.message and "RAM available" in err.message
        assert int(err.metadata["estimated_bytes"]) > int(err.metadata["available_bytes"]) > 0

        err = await fails(create(lora_job(
            base, [chat], hyperparameters={"learning_rate": -1.0, "lora_dropout": 1.5})), InvalidArgument)
        assert {v.field for v in err.violations} == {"spec.hyperparameters.learning_rate",
                                                     "spec.hyperparameters.lora_dropout"}

        listed = await stack.training.list_training_jobs()
        assert list(listed.training_jobs) == []


async def test_lora_sft_job_streams_loss_live_and_registers_an_adapter_with_lineage(tmp_path, s3_settings, tiny_model,
                                                                                  db_backend):
    async with training_stack(tmp_path, s3_settings, databases=db_backend) as stack:  # SQLite, then PostgreSQL
        base, chat = await _inputs(stack, tiny_model)
        job = await stack.training.create_training_job(
            lora_job(base, [chat], checkpoint_every_steps=2, output_model="models/tiny-shout"),
            training_job_id="shout-lora")
        assert (job.name, job.state, job.kind) == ("trainingJobs/shout-lora", cpb.JOB_STATE_QUEUED,
                                                   tpb.TRAINING_JOB_KIND_TRAIN)
        hp = job.spec.hyperparameters
        assert (hp.lora_alpha, hp.lora_dropout, list(hp.target_modules), hp.lr_scheduler, hp.warmup_ratio) == (
            32, 0.05, ["all-linear"], tpb.LR_SCHEDULER_COSINE, 0.05)
        assert job.preflight.accelerator == "cpu" and job.preflight.precision == tpb.PRECISION_FP32
        assert 0 < job.preflight.trainable_parameter_count < job.preflight.parameter_count

        losses, states, seen_running_loss = [], [], False
        async for event in stack.training.watch_training_job(job.name, timeout=240):
            which = event.WhichOneof("payload")
            if which == "metrics" and "loss" in event.metrics.values:
                losses.append((event.metrics.step, event.metrics.values["loss"]))
                if not seen_running_loss:  # the stream is live: the job is still running when loss arrives
                    now = await stack.training.get_training_job(job.name)
                    seen_running_loss = now.state == cpb.JOB_STATE_RUNNING
            elif which == "state_change":
                states.append(event.state_change.state)
        assert states[0] == cpb.JOB_STATE_QUEUED and states[-1] == cpb.JOB_STATE_SUCCEEDED, states
        assert [s for s, _ in losses] == [1, 2, 3, 4] and seen_running_loss

        done = await stack.training.get_training_job(job.name)
        assert done.state == cpb.JOB_STATE_SUCCEEDED and done.attempt_count == 1
        assert done.progress.fraction == 1.0 and done.progress.step == 4
        adapter = await stack.registry.get_model_version(done.outputs.model_version)
        assert adapter.name.startswith("models/tiny-shout/versions/") and adapter.kind == rpb.MODEL_KIND_ADAPTER
        assert adapter.lineage.base_model_version == base and list(adapter.lineage.dataset_versions) == [chat]
        assert adapter.lineage.job == job.name

        checkpoints = (await stack.training.list_checkpoints(parent=job.name)).checkpoints
        assert [c.step for c in checkpoints] == [2, 4]
        assert checkpoints[0].name == "trainingJobs/shout-lora/checkpoints/step-00000002"
        assert checkpoints[0].size_bytes > 0 and "loss" in checkpoints[0].metrics
        later = await stack.training.list_checkpoints(parent=job.name, filter="step > 2")
        assert [c.step for c in later.checkpoints] == [4]

        # Watch again from the middle: only the later events, and the stream ends.
        replay = [e async for e in stack.training.watch_training_job(job.name, after_sequence=5)]
        assert replay[0].sequence == 6 and replay[-1].state_change.state == cpb.JOB_STATE_SUCCEEDED

        err = await fails(stack.training.cancel_training_job(job.name), FailedPrecondition)
        assert err.reason == "JOB_ALREADY_FINISHED"

        watched = await asyncio.to_thread(CliRunner().invoke, jobs_app, ["watch", "shout-lora"],
                                          env={"YARD_TRAINING_ADDR": stack.training_addr})
        assert watched.exit_code == 0, watched.output
        assert f"model version: {adapter.name}" in watched.output and "4/4" in watched.output

        # Merge the registered adapter in a merge job; the merged version derives from the adapter.
        err = await fails(stack.training.merge_adapter(adapter_version=base), FailedPrecondition)
        assert err.reason == "NOT_AN_ADAPTER"
        merge = (await stack.training.merge_adapter(
            adapter_version=adapter.name, output_model="models/tiny-shout-merged")).training_job
        assert merge.kind == tpb.TRAINING_JOB_KIND_MERGE and merge.spec.base_model_version == base
        merged_job = await wait_state(stack.training, merge.name, TERMINAL, timeout=120)
        assert merged_job.state == cpb.JOB_STATE_SUCCEEDED, merged_job.error
        merged = await stack.registry.get_model_version(merged_job.outputs.merged_model_version)
        assert merged.kind == rpb.MODEL_KIND_MERGED and merged.lineage.base_model_version == adapter.name
        assert merged.name.startswith("models/tiny-shout-merged/versions/") and merged.lineage.job == merge.name


async def test_cancel_stops_a_running_job(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings) as stack:
        base, chat = await _inputs(stack, tiny_model)
        job = await stack.training.create_training_job(
            lora_job(base, [chat], hyperparameters={"max_steps": 100_000}))
        async for event in stack.training.watch_training_job(job.name, timeout=120):
            if event.WhichOneof("payload") == "metrics" and "loss" in event.metrics.values:
                break  # training is under way
        await stack.training.cancel_training_job(job.name)
        done = await wait_state(stack.training, job.name, TERMINAL, timeout=60)
        assert done.state == cpb.JOB_STATE_CANCELLED and done.end_time.seconds > 0
        assert 0 < done.progress.step < 100_000


async def test_list_pages_filters_and_cli_shows_jobs(tmp_path, s3_settings, tiny_model, db_backend):
    # an API-only replica (jobs stay QUEUED), on SQLite, then on PostgreSQL
    async with training_stack(tmp_path, s3_settings, worker=False, databases=db_backend) as stack:
        base, chat = await _inputs(stack, tiny_model)
        created = []
        for i, method in enumerate([tpb.TRAINING_METHOD_LORA, tpb.TRAINING_METHOD_DORA, tpb.TRAINING_METHOD_LORA]):
            job = await stack.training.create_training_job(lora_job(base, [chat], method=method),
                                                                  training_job_id=f"job-{i}")
            created.append(job.name)
        await stack.training.cancel_training_job("trainingJobs/job-2")

        names, token = [], ""
        while True:
            page = await stack.training.list_training_jobs(page_size=2, page_token=token,
                                                                  order_by="create_time asc")
            assert len(page.training_jobs) <= 2
            names += [j.name for j in page.training_jobs]
            if not (token := page.next_page_token):
                break
        assert names == created
        lora = await stack.training.list_training_jobs(
            filter="method = TRAINING_METHOD_LORA AND state = JOB_STATE_QUEUED")
        assert [j.name for j in lora.training_jobs] == ["trainingJobs/job-0"]
        await fails(_drain(stack.training.watch_training_job("trainingJobs/nope")), NotFound)
        err = await fails(stack.training.list_training_jobs(page_size=-1), InvalidArgument)
        assert err.violations[0].field == "page_size"

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
        job = await stack.training.get_training_job("trainingJobs/from-cli")
        assert job.spec.hyperparameters.max_steps == 2 and job.spec.dataset_versions == [chat]
        refused = await asyncio.to_thread(runner.invoke, train_app, [
            "dpo", "--model", base, "--dataset", chat], env=env)
        assert refused.exit_code == 1 and "DATASET_FORMAT_MISMATCH" in refused.output
        assert "Traceback" not in refused.output


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # the in-process servers log to the same stdout


def _printed(result) -> str:
    """What a CLI command printed, without the log lines of the servers running in this process."""
    return "\n".join(line for line in result.output.splitlines() if not _LOG_LINE.match(line))


def _table_rows(text: str) -> dict[str, str]:
    """``name  value`` lines of a two-column table printed to a pipe -> {name: value}."""
    rows = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name:
            rows[name] = value.strip()
    return rows


async def test_dry_run_reports_the_defaults_the_job_uses_and_queues_nothing(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings, worker=False) as stack:
        base, chat = await _inputs(stack, tiny_model)
        runner, env = CliRunner(), {"YARD_TRAINING_ADDR": stack.training_addr}
        args = ["sft", "--model", base, "--dataset", chat, "--set", "batch_size=3", "--name", "dry"]

        dry = await asyncio.to_thread(runner.invoke, train_app, [*args, "--dry-run"], env=env)
        assert dry.exit_code == 0, dry.output
        shown = _table_rows(_printed(dry))
        dry_json = await asyncio.to_thread(runner.invoke, train_app, [*args, "--dry-run", "-o", "json"], env=env)
        assert dry_json.exit_code == 0, dry_json.output
        planned = json.loads(_printed(dry_json))
        assert planned["state"] == "JOB_STATE_UNSPECIFIED" and planned["preflight"]["accelerator"] == "cpu"
        listed = await stack.training.list_training_jobs()
        assert list(listed.training_jobs) == []  # a dry run queues nothing

        created = await asyncio.to_thread(runner.invoke, train_app, args, env=env)
        assert created.exit_code == 0, created.output
        job = await stack.training.get_training_job("trainingJobs/dry")
        assert planned["spec"] == to_dict(job.spec)  # the dry run resolved exactly the spec the job got

        # What the recipe will read: the stored spec, parsed as the child process parses it.
        used = parse_spec(stack.app.jobs.store.get("trainingJobs/dry").spec).hyperparameters
        # the ms-swift defaults, method- and batch-dependent ones included, as --dry-run printed them
        assert (used.learning_rate, used.weight_decay, used.warmup_ratio, used.beta) == (1e-4, 0.1, 0.05, 0.1)
        assert used.gradient_accumulation_steps == 6 and used.batch_size == 3  # ceil(16 / 3)
        assert used.max_length == int(json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"])
        proto_names = {"lora_target_modules": "target_modules"}
        for name, value in used.model_dump().items():
            assert shown[proto_names.get(name, name)] == _value_text(value), name
        assert shown["precision"] == used.precision == "fp32" and shown["method"] == "lora"


async def test_jobs_list_and_show_print_json_yaml_and_whole_names_in_a_pipe(tmp_path, s3_settings, tiny_model):
    async with training_stack(tmp_path, s3_settings, worker=False) as stack:
        base, chat = await _inputs(stack, tiny_model)
        long_id = "a-training-job-whose-name-is-longer-than-a-narrow-terminal-is"
        await stack.training.create_training_job(lora_job(base, [chat]), training_job_id=long_id)
        runner, env = CliRunner(), {"YARD_TRAINING_ADDR": stack.training_addr, "COLUMNS": "40"}

        table = await asyncio.to_thread(runner.invoke, jobs_app, ["list"], env=env)
        assert table.exit_code == 0, table.output
        assert long_id in table.output and "…" not in table.output  # a pipe gets whole cells, however narrow
        as_json = await asyncio.to_thread(runner.invoke, jobs_app, ["list", "-o", "json"], env=env)
        assert as_json.exit_code == 0, as_json.output
        jobs = json.loads(_printed(as_json))
        assert [j["name"] for j in jobs] == [f"trainingJobs/{long_id}"]
        assert jobs[0]["spec"]["hyperparameters"]["lora_rank"] == 4 and jobs[0]["state"] == "JOB_STATE_QUEUED"
        as_yaml = await asyncio.to_thread(runner.invoke, jobs_app, ["show", long_id, "-o", "yaml"], env=env)
        assert as_yaml.exit_code == 0, as_yaml.output
        shown = yaml.safe_load(_printed(as_yaml))
        assert shown["name"] == f"trainingJobs/{long_id}" and shown["spec"]["base_model_version"] == base
        detail = await asyncio.to_thread(runner.invoke, jobs_app, ["show", long_id], env=env)
        assert f"trainingJobs/{long_id}" in detail.output and base in detail.output and "…" not in detail.output
        bad = await asyncio.to_thread(runner.invoke, jobs_app, ["list", "--filter", "step > 2"], env=env)
        assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output and "unknown field 'step'" in bad.output
