"""The evaluation service end to end, through the real services (registry, training, inference, evaluation on
loopback gRPC; nanio S3; SQLite) with SmolLM2-135M-Instruct on the transformers engine.

Covered: the catalogue; refusals naming the field; a model-version target (temporary deployment created,
scores recorded on the version, deployment removed) with a BBH multiple-choice task and GSM8K generation;
a deployment target and the same deployment's adapter, compared with paired deltas and changed samples; an
external OpenAI-compatible endpoint (the engine's own HTTP server) scoring the same log-likelihoods as the
Score RPC; HumanEval through the sandbox; a custom multiple-choice set from the registry; the temporary
deployment removed after failure and after cancel, and by the service's sweep; the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from cli.demo_models import build_smollm2
from modelyard.client import FailedPrecondition, InvalidArgument, NotFound
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.artifacts import S3ArtifactStore
from services.core.settings import S3Settings
from tests.support.evaluation_stack import deployment_gone, evaluation, evaluation_stack, wait_evaluation

from .test_inference import make_lora_adapter, wait_state

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

BBH_MC = "bbh_mc:boolean_expressions"
DEPLOYMENT = "deployments/smol"


@pytest.fixture(scope="module")
def module_s3(s3_server) -> S3Settings:
    return S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                      bucket=f"t-{uuid.uuid4().hex[:12]}", connect_retries=2, retry_backoff_s=0.05)  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, module_s3):
    async with evaluation_stack(tmp_path_factory.mktemp("evaluation"), module_s3) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def versions(stack, module_s3, tmp_path_factory) -> dict[str, str]:
    """SmolLM2 and a random LoRA adapter of it, registered; deployment ``smol`` (base + adapter ``noisy``) READY."""
    store = S3ArtifactStore.connect(module_s3)
    model_dir = build_smollm2()
    store.upload_dir("uploads/smollm2/v1", model_dir)
    base = await stack.registry.create_model_version(
        parent="models/smollm2", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix="uploads/smollm2/v1"))
    adapter_dir = make_lora_adapter(model_dir, tmp_path_factory.mktemp("lora") / "adapter", seed=3)
    store.upload_dir("uploads/smollm2-noisy/v1", adapter_dir)
    adapter = await stack.registry.register_derived_version(
        parent="models/smollm2-noisy", version_id="v1", kind=rpb.MODEL_KIND_ADAPTER,
        artifact_prefix="uploads/smollm2-noisy/v1", lineage=rpb.Lineage(base_model_version=base.name))
    await stack.inference.deploy(ipb.Deployment(
        model_version=base.name, engine=ipb.ENGINE_TRANSFORMERS,
        adapters=[ipb.Adapter(alias="noisy", model_version=adapter.name)],
        options=ipb.EngineOptions(max_num_seqs=16)), deployment_id="smol")
    d = await wait_state(stack.inference, DEPLOYMENT, {ipb.DEPLOYMENT_STATE_READY, ipb.DEPLOYMENT_STATE_FAILED}, 300)
    assert d.state == ipb.DEPLOYMENT_STATE_READY, d.error.message
    return {"base": base.name, "adapter": adapter.name}


async def samples(module_s3: S3Settings, key: str) -> list[dict]:
    store = S3ArtifactStore.connect(module_s3)
    data = await asyncio.to_thread(store.get_bytes, key)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


async def run_to_end(stack, ev: epb.Evaluation, timeout: float = 600, **kw) -> epb.Evaluation:
    created = await stack.evaluation.create_evaluation(ev, **kw)
    assert created.state == cpb.JOB_STATE_QUEUED
    return await wait_evaluation(stack.evaluation, created.name, timeout=timeout)


def result(ev: epb.Evaluation, benchmark: str) -> epb.BenchmarkResult:
    return next(r for r in ev.outputs.results if r.benchmark == f"benchmarks/{benchmark}")


# ----------------------------------------------------------------------------- catalogue and refusals


async def test_catalogue_lists_the_benchmarks(stack):
    names = {b.name: b async for b in stack.evaluation.iter_benchmarks()}
    for wanted in ("bbh:boolean_expressions", BBH_MC, "gsm8k", "humaneval", "arc_easy", "hellaswag", "truthfulqa_mc1"):
        assert f"benchmarks/{wanted}" in names, wanted
    assert any(n.startswith("benchmarks/mmlu") for n in names)
    gsm = names["benchmarks/gsm8k"]
    assert gsm.kind == epb.BENCHMARK_KIND_GENERATION and gsm.num_samples == 1319 and gsm.source == "bundled"
    assert gsm.metrics[0] == "exact_match" or gsm.metrics[0].startswith("exact_match")
    gen = (await stack.evaluation.list_benchmarks(filter="kind = BENCHMARK_KIND_CODE")).benchmarks
    assert [b.name for b in gen] == ["benchmarks/humaneval"]


async def test_refusals_name_the_field(stack, versions):
    ev = stack.evaluation
    err = await _fails(ev.create_evaluation(evaluation(versions["base"], "bbh:no_such_task")), InvalidArgument)
    assert err.violations[0].field == "spec.benchmarks[0].benchmark"
    err = await _fails(ev.create_evaluation(epb.Evaluation(spec=epb.EvaluationSpec(
        benchmarks=[epb.BenchmarkRun(benchmark="benchmarks/gsm8k")]))), InvalidArgument)
    assert err.violations[0].field == "spec.target"
    err = await _fails(ev.create_evaluation(evaluation("deployments/nope", "gsm8k")), NotFound)
    assert "spec.deployment" in err.message
    bad = evaluation(DEPLOYMENT, "gsm8k")
    bad.spec.adapter = "missing"
    err = await _fails(ev.create_evaluation(bad), InvalidArgument)
    assert err.violations[0].field == "spec.adapter" and "noisy" in err.message
    err = await _fails(ev.create_evaluation(evaluation({"base_url": "ftp://x", "model": "m"}, "gsm8k")), InvalidArgument)
    assert err.violations[0].field == "spec.endpoint.base_url"
    err = await _fails(ev.create_evaluation(evaluation(versions["base"], "gsm8k", limit=-1)), InvalidArgument)
    assert err.violations[0].field == "spec.limit"
    err = await _fails(ev.create_evaluation(evaluation("models/nope/versions/v1", "gsm8k")), NotFound)
    assert "spec.model_version" in err.message
    listed = await ev.list_evaluations()
    assert not listed.evaluations  # nothing was stored by a refused create


async def _fails(call, error):
    with pytest.raises(error) as info:
        await call
    return info.value


# ----------------------------------------------------------------------------- a model version, temporarily deployed


async def test_model_version_runs_on_a_temporary_deployment_and_records_scores(stack, versions, module_s3):
    gsm = epb.BenchmarkRun(benchmark="benchmarks/gsm8k", num_fewshot=1, limit=3)
    ev = await run_to_end(stack, evaluation(versions["base"], BBH_MC, gsm, limit=24,
                                            generation=epb.GenerationConfig(max_tokens=96)))  # fmt: skip
    assert ev.state == cpb.JOB_STATE_SUCCEEDED, ev.error
    assert ev.outputs.temporary_deployment and ev.outputs.deployment.startswith("deployments/ev-")
    assert await deployment_gone(stack.inference, ev.outputs.deployment)
    assert ev.progress.step == ev.progress.total_steps == 27
    mc = result(ev, BBH_MC)
    assert mc.num_samples == 24 and set(mc.metrics) >= {"acc", "acc_norm"}
    assert 0.0 <= mc.metrics["acc"] <= 1.0 and mc.stderr["acc"] > 0 and mc.samples_per_second > 0
    rows = await samples(module_s3, mc.predictions_artifact_key)
    assert len(rows) == 24 and all(len(r["extra"]["loglikelihoods"]) == 2 for r in rows)
    assert all(r["metrics"]["acc"] in (0.0, 1.0) for r in rows)
    g = result(ev, "gsm8k")
    assert g.num_samples == 3 and g.num_fewshot == 1 and any(m.startswith("exact_match") for m in g.metrics)
    grows = await samples(module_s3, g.predictions_artifact_key)
    assert all(r["prompt"].count("Question:") == 2 for r in grows)  # one shot + the question
    version = await stack.registry.get_model_version(versions["base"])
    recorded = {(s.benchmark, s.metric): s for s in version.scores if s.evaluation == ev.name}
    assert recorded[(f"benchmarks/{BBH_MC}", "acc")].value == pytest.approx(mc.metrics["acc"])
    assert recorded[(f"benchmarks/{BBH_MC}", "acc")].num_samples == 24
    report = json.loads(S3ArtifactStore.connect(module_s3).get_bytes(ev.outputs.report_artifact_key))
    assert [r["benchmark"] for r in report["results"]] == [BBH_MC, "gsm8k"]


async def test_failure_and_cancel_remove_the_temporary_deployment(stack, versions):
    # A generation limit the engine refuses: every benchmark fails after the deployment is up -> FAILED.
    ev = await run_to_end(stack, evaluation(versions["base"], "gsm8k", limit=2, generation=epb.GenerationConfig(
        max_tokens=30000)))
    assert ev.state == cpb.JOB_STATE_FAILED
    assert ev.outputs.deployment and await deployment_gone(stack.inference, ev.outputs.deployment)
    # Cancel once samples are being scored.
    created = await stack.evaluation.create_evaluation(evaluation(versions["base"], BBH_MC, limit=250, batch_size=1))
    deadline = asyncio.get_running_loop().time() + 300
    while True:
        current = await stack.evaluation.get_evaluation(created.name)
        if current.progress.step >= 2:
            break
        assert current.state in (cpb.JOB_STATE_QUEUED, cpb.JOB_STATE_RUNNING), current.error
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.3)
    await stack.evaluation.cancel_evaluation(created.name)
    done = await wait_evaluation(stack.evaluation, created.name)
    assert done.state == cpb.JOB_STATE_CANCELLED
    assert await deployment_gone(stack.inference, done.outputs.deployment)


async def test_sweep_removes_a_deployment_left_behind(stack, versions):
    # Fake a child killed before its cleanup: a model-version evaluation whose deployment still exists.
    gone = await run_to_end(stack, evaluation(versions["base"], BBH_MC, limit=2))
    from services.evaluation.domain import temporary_deployment_id

    name = f"deployments/{temporary_deployment_id(gone.name)}"
    await stack.inference.deploy(ipb.Deployment(model_version=versions["base"], engine=ipb.ENGINE_TRANSFORMERS),
                                 deployment_id=name.split("/")[1])  # fmt: skip
    stack.app.sweeper._done.clear()
    removed = await stack.app.sweeper.sweep()
    assert name in removed
    assert await deployment_gone(stack.inference, name)


# ----------------------------------------------------------------------------- deployments, adapters, compare


async def test_deployment_and_adapter_compared(stack, versions, module_s3):
    base = await run_to_end(stack, evaluation(DEPLOYMENT, BBH_MC, limit=40))
    tuned_spec = evaluation(DEPLOYMENT, BBH_MC, limit=40)
    tuned_spec.spec.adapter = "noisy"
    tuned = await run_to_end(stack, tuned_spec)
    assert base.state == tuned.state == cpb.JOB_STATE_SUCCEEDED
    assert not base.outputs.temporary_deployment and base.outputs.deployment == DEPLOYMENT
    assert tuned.outputs.model_version == versions["adapter"]  # scores land on the adapter's version
    cmp = await stack.evaluation.compare_evaluations([base.name, tuned.name])
    assert list(cmp.evaluations) == [base.name, tuned.name]
    acc = next(r for r in cmp.rows if r.metric == "acc")
    d = acc.deltas[0]
    a, b = result(base, BBH_MC).metrics["acc"], result(tuned, BBH_MC).metrics["acc"]
    assert d.paired_samples == 40 and d.delta == pytest.approx(b - a)
    assert d.ci_low <= d.delta <= d.ci_high
    a_rows = {r["doc_id"]: r for r in await samples(module_s3, result(base, BBH_MC).predictions_artifact_key)}
    b_rows = {r["doc_id"]: r for r in await samples(module_s3, result(tuned, BBH_MC).predictions_artifact_key)}
    differing = {d for d in a_rows if a_rows[d]["metrics"]["acc"] != b_rows[d]["metrics"]["acc"]}
    changed = [s for s in cmp.changed_samples if s.benchmark == f"benchmarks/{BBH_MC}"]
    assert len(changed) == min(20, len(differing))
    assert {s.doc_id for s in changed} <= differing
    for s in changed:
        assert s.baseline_score == a_rows[s.doc_id]["metrics"]["acc"] and s.score == b_rows[s.doc_id]["metrics"]["acc"]
        assert s.evaluation == tuned.name and s.reference
    err = await _fails(stack.evaluation.compare_evaluations([base.name]), InvalidArgument)
    assert err.violations[0].field == "names"


async def test_endpoint_target_matches_the_score_rpc(stack, versions, module_s3):
    dep = await stack.inference.get_deployment(DEPLOYMENT)
    url = dep.engine_endpoints[0].rstrip("/") + "/v1"
    model = dep.served_model_name or "smol"
    via_endpoint = await run_to_end(stack, evaluation({"base_url": url, "model": model}, BBH_MC, limit=12))
    via_score = await run_to_end(stack, evaluation(DEPLOYMENT, BBH_MC, limit=12))
    assert via_endpoint.state == via_score.state == cpb.JOB_STATE_SUCCEEDED, via_endpoint.error
    assert not via_endpoint.outputs.model_version  # nothing recorded for an endpoint
    e = {r["doc_id"]: r for r in await samples(module_s3, result(via_endpoint, BBH_MC).predictions_artifact_key)}
    s = {r["doc_id"]: r for r in await samples(module_s3, result(via_score, BBH_MC).predictions_artifact_key)}
    assert e.keys() == s.keys()
    for doc in e:
        for x, y in zip(e[doc]["extra"]["loglikelihoods"], s[doc]["extra"]["loglikelihoods"], strict=True):
            assert x == pytest.approx(y, abs=2e-3)
    assert result(via_endpoint, BBH_MC).metrics["acc"] == result(via_score, BBH_MC).metrics["acc"]


# ----------------------------------------------------------------------------- code and custom sets


async def test_humaneval_pass_at_1_through_the_sandbox(stack, versions, module_s3):
    ev = await run_to_end(stack, evaluation(DEPLOYMENT, "humaneval", limit=3,
                                            generation=epb.GenerationConfig(max_tokens=96)))  # fmt: skip
    assert ev.state == cpb.JOB_STATE_SUCCEEDED, ev.error
    r = result(ev, "humaneval")
    assert r.num_samples == 3 and "pass@1" in r.metrics and 0.0 <= r.metrics["pass@1"] <= 1.0
    rows = await samples(module_s3, r.predictions_artifact_key)
    statuses = [s for row in rows for s in row["extra"]["statuses"]]
    assert len(statuses) == 3 and set(statuses) <= {"passed", "failed", "timeout"}


async def test_custom_multiple_choice_set_from_the_registry(stack, tmp_path, module_s3):
    rows = [
        {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": "four"},
        {"question": "Which is a fruit?", "choices": ["carrot", "apple"], "answer": "B"},
        {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
    ]
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = await stack.registry.upload_dataset(path, parent="datasets/quiz")
    run = epb.BenchmarkRun(dataset_version=dataset.name)
    ev = await run_to_end(stack, evaluation(DEPLOYMENT, run))
    assert ev.state == cpb.JOB_STATE_SUCCEEDED, ev.error
    r = result(ev, "custom:quiz")
    assert r.num_samples == 4 and "acc" in r.metrics
    got = await samples(module_s3, r.predictions_artifact_key)
    assert [len(g["extra"]["loglikelihoods"]) for g in got] == [3, 3, 2, 3]
    # A training dataset is not an evaluation set.
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n")  # fmt: skip
    chat_set = await stack.registry.upload_dataset(chat, parent="datasets/chatty")
    err = await _fails(stack.evaluation.create_evaluation(
        evaluation(DEPLOYMENT, epb.BenchmarkRun(dataset_version=chat_set.name))), FailedPrecondition)
    assert err.reason == "NOT_AN_EVALUATION_SET" and "spec.benchmarks[0].dataset_version" in err.message


# ----------------------------------------------------------------------------- eval_after of a training job


async def test_training_job_evaluates_its_result_and_its_base(stack, module_s3, tmp_path):
    from cli.demo_models import build_tiny_model
    from tests.support.training_stack import import_model, lora_job, upload_dataset
    from tests.support.training_stack import wait_state as wait_training

    base = await import_model(stack.registry, build_tiny_model(tmp_path / "tiny"), parent="models/tiny-ea")
    data = Path(__file__).resolve().parents[1] / "data" / "training" / "shout_train.jsonl"
    dataset = await upload_dataset(stack.registry, "datasets/shout-ea", data)
    # A typo in eval_after fails the training job's create, before anything is queued.
    bad = lora_job(base, [dataset], eval_after=tpb.EvalAfter(benchmarks=["bbh_mc:nope"]))
    err = await _fails(stack.training.create_training_job(bad), InvalidArgument)
    assert err.violations[0].field.startswith("spec.eval_after.benchmarks[0]")
    job = await stack.training.create_training_job(lora_job(base, [dataset], eval_after=tpb.EvalAfter(
        benchmarks=[BBH_MC], limit=4, include_base=True)))  # fmt: skip
    done = await wait_training(stack.training, job.name, {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED}, 600)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    assert done.spec.eval_after.benchmarks == [BBH_MC] and done.spec.eval_after.include_base
    after, before = done.outputs.evaluation, done.outputs.base_evaluation
    assert after.endswith("-after") and before.endswith("-before")
    a = await wait_evaluation(stack.evaluation, after)
    b = await wait_evaluation(stack.evaluation, before)
    assert a.state == b.state == cpb.JOB_STATE_SUCCEEDED, (a.error.message, b.error.message)
    assert a.spec.model_version == done.outputs.model_version and b.spec.model_version == base
    assert a.labels["training_job"] == job.name.split("/")[1]
    cmp = await stack.evaluation.compare_evaluations([before, after])
    assert any(r.metric == "acc" and r.deltas[0].paired_samples == 4 for r in cmp.rows)
    jid = job.name.split("/")[1]
    listed = await stack.evaluation.list_evaluations(filter=f'labels.training_job = "{jid}"')
    assert {e.name for e in listed.evaluations} == {after, before}


# ----------------------------------------------------------------------------- the CLI

CLI = "import sys; from cli.main import app; app(args=sys.argv[1:])"


async def run_cli(stack, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "YARD_EVALUATION_ADDR": stack.evaluation_addr, "COLUMNS": "250"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLI, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_cli_runs_lists_shows_and_compares(stack, versions):
    rc, out, err = await run_cli(stack, "eval", "run", "deployments/smol", "--benchmark", BBH_MC, "--limit", "6",
                                 "--id", "cli-base", "--watch")  # fmt: skip
    assert rc == 0, err
    assert "acc" in out and BBH_MC in out
    rc, out, err = await run_cli(stack, "eval", "run", "deployments/smol:noisy", "-b", BBH_MC, "--limit", "6",
                                 "--id", "cli-noisy", "--watch")  # fmt: skip
    assert rc == 0, err
    rc, out, err = await run_cli(stack, "eval", "compare", "cli-base", "cli-noisy")
    assert rc == 0, err
    assert "Δ cli-noisy" in out and "acc" in out
    rc, out, err = await run_cli(stack, "eval", "list")
    assert rc == 0 and "evaluations/cli-base" in out
    rc, out, err = await run_cli(stack, "eval", "show", "cli-base", "-o", "json")
    assert rc == 0 and json.loads(out)["name"] == "evaluations/cli-base"
    rc, out, err = await run_cli(stack, "eval", "benchmarks", "--filter", "kind = BENCHMARK_KIND_CODE")
    assert rc == 0 and "humaneval" in out
    rc, out, err = await run_cli(stack, "eval", "run", "deployments/smol", "-b", "nope:nope")
    assert rc == 1 and "spec.benchmarks[0].benchmark" in err and "Traceback" not in err



# ----------------------------------------------------------------------------- on PostgreSQL


async def test_model_version_evaluation_on_postgresql_records_scores_and_lists(postgres_backend, module_s3, tmp_path):
    """Registry, training, inference and evaluation each on a PostgreSQL database of its own (the tests above run
    on SQLite): a model-version evaluation runs as a job on a temporary deployment, records its scores on the
    version, removes the deployment, and lists and filters like on SQLite."""
    from cli.demo_models import build_tiny_model

    async with evaluation_stack(tmp_path / "pg", module_s3, databases=postgres_backend) as pg:
        assert pg.app.settings.database_url.startswith("postgresql+psycopg://")
        await asyncio.to_thread(S3ArtifactStore.connect(module_s3).upload_dir, "uploads/tiny-pg/v1",
                                build_tiny_model(tmp_path / "tiny"))
        base = (await pg.registry.create_model_version(parent="models/tiny-pg", version_id="v1", model_version=(
            rpb.ModelVersion(artifact_prefix="uploads/tiny-pg/v1")))).name
        path = tmp_path / "quiz.jsonl"
        path.write_text("".join(json.dumps({"question": f"{a} + {a} =", "choices": [str(2 * a), str(a)], "answer": 0})
                                + "\n" for a in range(1, 5)))  # fmt: skip
        quiz = await pg.registry.upload_dataset(path, parent="datasets/quiz-pg")
        created = await pg.evaluation.create_evaluation(
            evaluation(base, epb.BenchmarkRun(dataset_version=quiz.name)), evaluation_id="pg-1")
        ev = await wait_evaluation(pg.evaluation, created.name)
        assert ev.state == cpb.JOB_STATE_SUCCEEDED, ev.error
        assert ev.outputs.temporary_deployment and await deployment_gone(pg.inference, ev.outputs.deployment)
        r = result(ev, "custom:quiz-pg")
        assert r.num_samples == 4 and "acc" in r.metrics
        version = await pg.registry.get_model_version(base)
        assert {(s.evaluation, s.metric) for s in version.scores} >= {(ev.name, "acc")}
        listed = await pg.evaluation.list_evaluations(filter="state = JOB_STATE_SUCCEEDED", order_by="create_time desc")
        assert [e.name for e in listed.evaluations] == [ev.name] and ev.end_time.seconds >= ev.create_time.seconds
