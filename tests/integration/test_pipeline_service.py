"""The pipeline service through the real stack (every service in-process, jobs and engines as children):
a whole flow on a tiny model (import -> datasets -> SFT LoRA + merge -> DPO -> merge -> int8 -> deploy -> eval of
three versions -> smoke chat) with its report; a malformed document refused before anything runs; a run that
survives the CLI that started it being killed; a failed step resumed by a retry without redoing finished steps;
a run whose job child dies re-attaches to the training job of its running step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from cli.demo_models import build_tiny_model
from modelyard.client import InvalidArgument
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.pipeline.v1 import pipeline_pb2 as ppb
from services.core.settings import S3Settings
from tests.support.pipeline_stack import pipeline_stack, wait_run

pytestmark = pytest.mark.timeout(900)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHOUT = PROJECT_ROOT / "examples" / "shout" / "train.jsonl"
HP = ("{batch_size: 2, gradient_accumulation_steps: 1, max_length: 64, learning_rate: 1e-3, lora_rank: 4, "
      "precision: fp32, max_steps: \"${params.steps}\"}")  # fmt: skip

FLOW = textwrap.dedent(f"""
    name: tiny-flow
    params: {{model_dir: null, steps: 4, sft_data: sft.jsonl}}
    steps:
      - {{id: base, type: import, source: "${{params.model_dir}}", model: tiny}}
      - {{id: sft-data, type: dataset, path: "${{params.sft_data}}", dataset: shout}}
      - {{id: pref-data, type: dataset, path: pref.jsonl, dataset: shout-pref}}
      - id: sft
        type: sft
        model: ${{steps.base.model_version}}
        datasets: ["${{steps.sft-data.dataset_version}}"]
        output_model: tiny-sft
        merge: true
        checkpoint_every_steps: 2
        hyperparameters: {HP}
      - id: dpo
        type: dpo
        model: ${{steps.sft.merged_model_version}}
        datasets: ["${{steps.pref-data.dataset_version}}"]
        output_model: tiny-dpo
        hyperparameters: {HP}
      - {{id: merge, type: merge, adapter: "${{steps.dpo.model_version}}", output_model: tiny-tuned}}
      - {{id: int8, type: quantize, model: "${{steps.merge.model_version}}", method: int8, output_model: tiny-int8}}
      - {{id: serve, type: deploy, model: "${{steps.int8.model_version}}", name: tiny-int8, engine: transformers}}
      - id: eval
        type: eval
        engine: transformers
        targets: {{base: "${{steps.base.model_version}}", tuned: "${{steps.merge.model_version}}",
                  int8: "${{steps.serve.deployment}}"}}
        benchmarks: [bbh_mc:boolean_expressions]
        limit: 6
        decode: {{requests: 1, max_tokens: 8}}
      - {{id: smoke, type: chat, deployment: "${{steps.serve.deployment}}", prompt: "Shout this word: kitten",
          max_tokens: 4}}
""")

SHORT = textwrap.dedent("""
    name: short
    params: {model_dir: null, steps: 4, sft_data: sft.jsonl}
    steps:
      - {id: base, type: import, source: "${params.model_dir}", model: MODEL}
      - {id: data, type: dataset, path: "${params.sft_data}", dataset: DATASET}
      - id: sft
        type: sft
        model: ${steps.base.model_version}
        datasets: ["${steps.data.dataset_version}"]
        hyperparameters: HP
""").replace("HP", HP)


@pytest.fixture(scope="module")
def module_s3(s3_server) -> S3Settings:
    return S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                      bucket=f"t-{uuid.uuid4().hex[:12]}", connect_retries=2, retry_backoff_s=0.05)  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, module_s3):
    async with pipeline_stack(tmp_path_factory.mktemp("pipeline"), module_s3) as s:
        yield s


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The pipeline files' directory: the tiny model, an SFT set and a preference set."""
    d = tmp_path_factory.mktemp("files")
    build_tiny_model(d / "model", hidden=128, head_dim=64)
    (d / "sft.jsonl").write_text(SHOUT.read_text())
    rows = [json.loads(line) for line in SHOUT.read_text().splitlines()]
    with (d / "pref.jsonl").open("w") as f:
        for r in rows[:24]:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            f.write(json.dumps({"prompt": user, "chosen": answer, "rejected": answer.strip("[]!").lower()}) + "\n")
    return d


def _cli_env(stack) -> dict[str, str]:
    return {**os.environ, "YARD_PIPELINE_ADDR": stack.pipeline_addr, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


async def yard(stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`yard ARGS` in its own process (in a thread: the services answer on this test's event loop)."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", *args], capture_output=True,
                                   text=True, env=_cli_env(stack), cwd=PROJECT_ROOT, timeout=timeout)  # fmt: skip


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_document_is_refused_naming_step_and_field_and_nothing_runs(stack, workdir):
    bad = FLOW.replace("learning_rate: 1e-3", "learnin_rate: 1e-3").replace(
        '"${steps.merge.model_version}", method: int8', '"${steps.mrge.model_version}", method: int9')
    with pytest.raises(InvalidArgument) as info:
        await stack.pipeline.create_pipeline_run(bad, params={"model_dir": str(workdir / "model")},
                                                 working_dir=str(workdir))  # fmt: skip
    fields = {v.field: v.description for v in info.value.violations}
    assert "unknown field" in fields["steps.sft.hyperparameters.learnin_rate"]
    assert "no earlier step 'mrge'" in fields["steps.int8.model"]
    assert "int9" in fields["steps.int8.method"]
    with pytest.raises(InvalidArgument) as info:  # a required param, a missing file, an unknown step type
        await stack.pipeline.create_pipeline_run(
            FLOW.replace("path: pref.jsonl", "path: nowhere.jsonl").replace("type: chat", "type: chatt"),
            working_dir=str(workdir))  # fmt: skip
    fields = {v.field: v.description for v in info.value.violations}
    assert "required" in fields["params.model_dir"]
    assert "must be one of" in fields["steps.smoke.type"]
    with pytest.raises(InvalidArgument) as info:
        await stack.pipeline.create_pipeline_run(FLOW.replace("path: pref.jsonl", "path: nowhere.jsonl"),
                                                 params={"model_dir": str(workdir / "model")}, working_dir=str(workdir))  # fmt: skip
    assert [v.field for v in info.value.violations] == ["steps.pref-data.path"], info.value.violations
    with pytest.raises(InvalidArgument) as info:
        await stack.pipeline.create_pipeline_run("steps: [", working_dir=str(workdir))
    assert info.value.violations[0].field == "source" and "line" in info.value.violations[0].description
    # the CLI prints the same violations and exits 1
    (workdir / "bad.yaml").write_text(bad)
    out = await yard(stack, "pipeline", "run", str(workdir / "bad.yaml"), "-p", f"model_dir={workdir / 'model'}")
    assert out.returncode == 1
    assert "steps.sft.hyperparameters.learnin_rate: unknown field" in out.stderr
    assert not (await stack.pipeline.list_pipeline_runs()).runs


@pytest.mark.asyncio(loop_scope="module")
async def test_whole_flow_reports_scores_sizes_speed_and_step_times(stack, workdir):
    (workdir / "flow.yaml").write_text(FLOW)
    run = await stack.pipeline.create_pipeline_run(FLOW, params={"model_dir": str(workdir / "model")},
                                                   working_dir=str(workdir), run_id="flow")  # fmt: skip
    assert [s.id for s in run.steps] == ["base", "sft-data", "pref-data", "sft", "dpo", "merge", "int8", "serve",
                                         "eval", "smoke"]  # fmt: skip
    assert all(s.state == ppb.STEP_STATE_PENDING for s in run.steps)
    losses = []
    async for event in stack.pipeline.watch_pipeline_run(run.name):
        if event.WhichOneof("payload") == "metrics":
            losses += [v for k, v in event.metrics.values.items() if k in ("sft.loss", "dpo.loss")]
    done = await stack.pipeline.get_pipeline_run(run.name)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, (done.error, [(s.id, s.error.message) for s in done.steps])
    assert losses, "the training steps' losses are relayed as run metrics"
    steps = {s.id: s for s in done.steps}
    assert all(s.state == ppb.STEP_STATE_SUCCEEDED for s in done.steps)
    assert steps["sft"].resource == "trainingJobs/flow-sft"
    assert steps["int8"].resource == "quantizationJobs/flow-int8"
    tuned, int8 = steps["merge"].outputs["model_version"], steps["int8"].outputs["model_version"]
    assert tuned == "models/tiny-tuned/versions/v1" and int8 == "models/tiny-int8/versions/v1"
    assert steps["smoke"].outputs["text"]
    # lineage: int8 <- tuned (merged DPO adapter) <- merged SFT <- base
    registry = stack.services.registry
    assert (await registry.get_model_version(int8)).lineage.base_model_version == tuned
    report = done.outputs.report
    assert report.benchmark == "benchmarks/bbh_mc:boolean_expressions" and report.metric == "acc"
    assert [r.label for r in report.rows] == ["base", "tuned", "int8"]
    for r in report.rows:
        assert 0 <= r.score <= 1 and r.num_samples == 6 and r.size_bytes > 0 and r.evaluation
        assert r.decode_tokens_per_second > 0
    assert report.rows[2].size_bytes < report.rows[1].size_bytes  # quantized is smaller than what it came from
    assert [(d.label, d.baseline) for d in report.deltas] == [("tuned", "base"), ("int8", "base")]
    for d in report.deltas:
        assert d.ci95_low <= d.delta <= d.ci95_high
    assert {t.step for t in report.step_times} >= {"base", "sft", "dpo", "merge", "int8", "serve", "eval"}
    assert any("95% CI" in n for n in report.notes)
    # the temporary deployments of the model-version targets are gone; the deployed one stays
    names = [d.name for d in (await stack.services.inference.list_deployments(page_size=100)).deployments]
    assert names == ["deployments/tiny-int8"]
    # `yard pipeline show` prints the report table from another process
    out = await yard(stack, "pipeline", "show", "flow")
    assert out.returncode == 0, out.stderr
    assert "report" in out.stdout and "tiny-int8/versions/v1" in out.stdout and "step times" in out.stdout


@pytest.mark.asyncio(loop_scope="module")
async def test_run_survives_its_cli_being_killed_and_is_watched_from_another_process(stack, workdir):
    (workdir / "short.yaml").write_text(SHORT.replace("MODEL", "kill").replace("DATASET", "kill"))
    cli = subprocess.Popen([sys.executable, "-m", "cli.main", "pipeline", "run", str(workdir / "short.yaml"),
                            "-p", f"model_dir={workdir / 'model'}", "-p", "steps=300", "--id", "killed"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_cli_env(stack),
                           cwd=PROJECT_ROOT, start_new_session=True)  # fmt: skip
    run = await wait_run(stack.pipeline, "pipelineRuns/killed", timeout=120, until=lambda r: any(
        s.id == "sft" and s.state == ppb.STEP_STATE_RUNNING for s in r.steps))
    os.killpg(cli.pid, signal.SIGKILL)  # the terminal that started it is gone
    await asyncio.to_thread(cli.wait, 30)
    watcher = await yard(stack, "pipeline", "watch", "killed", timeout=600)
    assert watcher.returncode == 0, watcher.stdout + watcher.stderr
    assert "step sft succeeded" in watcher.stdout
    run = await stack.pipeline.get_pipeline_run("pipelineRuns/killed")
    assert run.state == cpb.JOB_STATE_SUCCEEDED and run.attempt_count == 1
    listed = await yard(stack, "pipeline", "list")
    assert "pipelineRuns/killed" in listed.stdout and "3/3" in listed.stdout


@pytest.mark.asyncio(loop_scope="module")
async def test_failed_step_resumes_on_retry_without_redoing_finished_steps(stack, workdir):
    (workdir / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nope": 1}\n')
    src = SHORT.replace("MODEL", "retry").replace("DATASET", "retry")
    params = {"model_dir": str(workdir / "model"), "sft_data": "broken.jsonl"}
    run = await stack.pipeline.create_pipeline_run(src, params=params, working_dir=str(workdir), run_id="retry")
    failed = await wait_run(stack.pipeline, run.name)
    assert failed.state == cpb.JOB_STATE_FAILED
    steps = {s.id: s for s in failed.steps}
    assert steps["base"].state == ppb.STEP_STATE_SUCCEEDED
    assert steps["data"].state == ppb.STEP_STATE_FAILED and steps["data"].error.message
    assert steps["sft"].state == ppb.STEP_STATE_PENDING
    assert "step data" in failed.error.message
    imports_before = len((await stack.services.registry.list_imports(page_size=100)).model_imports)
    # fix the file in place, then retry from the CLI: the import is kept, the dataset step runs again
    (workdir / "broken.jsonl").write_text(SHOUT.read_text())
    out = await yard(stack, "pipeline", "retry", "retry", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kept: base" in out.stdout
    done = await stack.pipeline.get_pipeline_run(run.name)
    steps = {s.id: s for s in done.steps}
    assert done.state == cpb.JOB_STATE_SUCCEEDED
    assert steps["base"].attempt_count == 1 and steps["data"].attempt_count == 2 and steps["sft"].attempt_count == 1
    assert len((await stack.services.registry.list_imports(page_size=100)).model_imports) == imports_before
    # retrying a finished run is refused
    with pytest.raises(Exception) as info:
        await stack.pipeline.retry_pipeline_run(run.name)
    assert getattr(info.value, "reason", "") == "JOB_NOT_RETRYABLE"


@pytest.mark.asyncio(loop_scope="module")
async def test_run_whose_child_dies_reattaches_to_the_running_training_job(stack, workdir):
    src = SHORT.replace("MODEL", "crash").replace("DATASET", "crash")
    run = await stack.pipeline.create_pipeline_run(src, params={"model_dir": str(workdir / "model"), "steps": "300"},
                                                   working_dir=str(workdir), run_id="crash")  # fmt: skip
    await wait_run(stack.pipeline, run.name, timeout=120, until=lambda r: any(
        s.id == "sft" and s.state == ppb.STEP_STATE_RUNNING and s.resource for s in r.steps))
    job = stack.app.jobs.store.get(run.name)
    assert job.child_pid
    psutil.Process(job.child_pid).kill()  # the run's process dies mid-step (an OOM kill, a node lost)
    done = await wait_run(stack.pipeline, run.name, timeout=600)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    assert done.attempt_count == 2
    sft = next(s for s in done.steps if s.id == "sft")
    assert sft.resource == "trainingJobs/crash-sft" and sft.attempt_count == 1
    jobs = (await stack.services.training.list_training_jobs(page_size=100)).training_jobs
    assert [j.name for j in jobs if j.name.startswith("trainingJobs/crash-")] == ["trainingJobs/crash-sft"]


@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_stops_the_running_step_job_and_retry_starts_that_step_anew(stack, workdir):
    src = SHORT.replace("MODEL", "cancel").replace("DATASET", "cancel")
    run = await stack.pipeline.create_pipeline_run(src, params={"model_dir": str(workdir / "model"), "steps": "300"},
                                                   working_dir=str(workdir), run_id="cancel")  # fmt: skip
    await wait_run(stack.pipeline, run.name, timeout=120, until=lambda r: any(
        s.id == "sft" and s.state == ppb.STEP_STATE_RUNNING and s.resource for s in r.steps))
    out = await yard(stack, "pipeline", "cancel", "cancel")
    assert out.returncode == 0, out.stderr
    done = await wait_run(stack.pipeline, run.name, timeout=120)
    assert done.state == cpb.JOB_STATE_CANCELLED
    sft = next(s for s in done.steps if s.id == "sft")
    assert sft.state == ppb.STEP_STATE_CANCELLED and sft.resource == "trainingJobs/cancel-sft"
    job = await stack.services.training.get_training_job("trainingJobs/cancel-sft")
    deadline = asyncio.get_running_loop().time() + 60
    while job.state != cpb.JOB_STATE_CANCELLED and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.3)
        job = await stack.services.training.get_training_job("trainingJobs/cancel-sft")
    assert job.state == cpb.JOB_STATE_CANCELLED  # the step's job was stopped with the run
    await stack.pipeline.retry_pipeline_run(run.name)
    resumed = await wait_run(stack.pipeline, run.name, timeout=120, until=lambda r: any(
        s.id == "sft" and s.state == ppb.STEP_STATE_RUNNING and s.resource for s in r.steps))
    sft = next(s for s in resumed.steps if s.id == "sft")
    assert sft.resource == "trainingJobs/cancel-sft-2" and sft.attempt_count == 2
    await stack.pipeline.cancel_pipeline_run(run.name)  # do not hold the training slot for the next tests
    assert (await wait_run(stack.pipeline, run.name, timeout=120)).state == cpb.JOB_STATE_CANCELLED
