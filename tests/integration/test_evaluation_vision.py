"""An image question set as a custom benchmark, end to end through the real services (registry, training,
inference, evaluation on loopback gRPC; nanio S3; SQLite) with a tiny random Qwen2-VL on the transformers
engine.

Covered: the colour set (``cli.demo_vlm.write_shape_eval_set``: a generated picture per row) uploaded as an
archive in the multiple-choice and qa formats, run against a deployment of the VLM: every row's prompt
carried its image, one record per row, a score in [0, 1] recorded on the model version, and a second run
with the same seed answering every row the same way (a random model scores near chance, so the machinery
is what is asserted, not an accuracy); the engine's OpenAI server as an endpoint target answering the same.
A text-only model (a model version, and a deployment of it) refuses the image set before anything runs; a
row whose image cannot be loaded is named (by the registry at upload, or else by the evaluation).
"""

from __future__ import annotations

import asyncio
import json
import zipfile

import pytest
import pytest_asyncio

from cli.demo_models import build_tiny_model
from cli.demo_vlm import build_tiny_vlm, write_shape_eval_set
from modelyard.client import FailedPrecondition, InvalidArgument, error_from_status
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from services.core.settings import S3Settings
from tests.support.evaluation_stack import evaluation, evaluation_stack, wait_evaluation

from .test_inference import module_s3, wait_state  # noqa: F401 - module_s3 is a fixture

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

VLM = "deployments/vlm"
ROWS = 8


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, module_s3):
    async with evaluation_stack(tmp_path_factory.mktemp("evaluation-vision"), module_s3) as s:
        yield s


async def register(stack, module_s3, folder, model: str) -> str:
    store = S3ArtifactStore.connect(module_s3)
    await asyncio.to_thread(store.upload_dir, f"uploads/{model}/v1", folder)
    version = await stack.registry.create_model_version(
        parent=f"models/{model}", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix=f"uploads/{model}/v1"))
    return version.name


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vlm(stack, module_s3, tmp_path_factory) -> str:
    """The tiny VLM registered and deployed as ``vlm`` (transformers engine), READY; its version's name."""
    name = await register(stack, module_s3, build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model"), "tiny-vlm")
    await stack.inference.deploy(ipb.Deployment(model_version=name, engine=ipb.ENGINE_TRANSFORMERS,
                                                options=ipb.EngineOptions(max_num_seqs=8)), deployment_id="vlm")  # fmt: skip
    d = await wait_state(stack.inference, VLM, {ipb.DEPLOYMENT_STATE_READY, ipb.DEPLOYMENT_STATE_FAILED}, 300)
    assert d.state == ipb.DEPLOYMENT_STATE_READY, d.error.message
    return name


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def image_sets(stack, tmp_path_factory) -> dict[str, str]:
    """The colour set uploaded as archives, multiple choice and qa; dataset version names by format."""
    root = tmp_path_factory.mktemp("colour-sets")
    out = {}
    for fmt in ("multiple_choice", "qa"):
        archive = write_shape_eval_set(root / fmt, ROWS, seed=5, fmt=fmt)
        out[fmt] = (await stack.registry.upload_dataset(archive, parent=f"datasets/colours-{fmt.replace('_', '-')}")).name
    return out


async def samples(module_s3: S3Settings, key: str) -> list[dict]:
    data = await asyncio.to_thread(S3ArtifactStore.connect(module_s3).get_bytes, key)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


async def run_to_end(stack, ev: epb.Evaluation) -> epb.Evaluation:
    created = await stack.evaluation.create_evaluation(ev)
    return await wait_evaluation(stack.evaluation, created.name, timeout=420)


def result(ev: epb.Evaluation, benchmark: str) -> epb.BenchmarkResult:
    return next(r for r in ev.outputs.results if r.benchmark == f"benchmarks/{benchmark}")


async def test_image_sets_run_as_custom_benchmarks_on_a_vlm(stack, vlm, image_sets, module_s3):
    runs = [epb.BenchmarkRun(dataset_version=image_sets["multiple_choice"]),
            epb.BenchmarkRun(dataset_version=image_sets["qa"])]  # fmt: skip
    spec = {"generation": epb.GenerationConfig(max_tokens=8, seed=7)}
    first = await run_to_end(stack, evaluation(VLM, *runs, **spec))
    assert first.state == cpb.JOB_STATE_SUCCEEDED, first.error
    mc, qa = result(first, "custom:colours-multiple-choice"), result(first, "custom:colours-qa")
    assert mc.num_samples == ROWS and 0.0 <= mc.metrics["acc"] <= 1.0 and not mc.HasField("error")
    assert qa.num_samples == ROWS and 0.0 <= qa.metrics["exact_match"] <= 1.0
    mc_rows = await samples(module_s3, mc.predictions_artifact_key)
    qa_rows = await samples(module_s3, qa.predictions_artifact_key)
    assert len(mc_rows) == len(qa_rows) == ROWS
    # Every prompt carried its image, and the multiple-choice rows were answered by generation.
    assert [(r["extra"]["images"], r["extra"]["images_sent"]) for r in mc_rows + qa_rows] == [(1, 1)] * (2 * ROWS)
    assert all("response" in r["extra"] and r["extra"]["pred"] in (-1, 0, 1, 2, 3) for r in mc_rows)
    assert all(r["prompt"].startswith("What colour is the shape?\nA. red") for r in mc_rows)
    assert sorted({r["reference"] for r in qa_rows}) == ["blue", "green", "red", "yellow"]
    report = json.loads(S3ArtifactStore.connect(module_s3).get_bytes(first.outputs.report_artifact_key))
    assert [r["num_images"] for r in report["results"]] == [ROWS, ROWS]
    # Scores recorded on the deployed version, as for text benchmarks.
    version = await stack.registry.get_model_version(vlm)
    recorded = {(s.benchmark, s.metric): s for s in version.scores if s.evaluation == first.name}
    assert recorded[("benchmarks/custom:colours-multiple-choice", "acc")].value == pytest.approx(mc.metrics["acc"])
    assert recorded[("benchmarks/custom:colours-qa", "exact_match")].num_samples == ROWS
    # The same seed: the same answer on every row.
    second = await run_to_end(stack, evaluation(VLM, *runs, **spec))
    assert second.state == cpb.JOB_STATE_SUCCEEDED, second.error
    again = await samples(module_s3, result(second, "custom:colours-multiple-choice").predictions_artifact_key)
    assert [(r["doc_id"], r["extra"]["response"]) for r in again] == [
        (r["doc_id"], r["extra"]["response"]) for r in mc_rows
    ]


async def test_an_openai_endpoint_gets_the_images_as_image_url_parts(stack, vlm, image_sets, module_s3):
    """The engine's own OpenAI server as an endpoint target: the same greedy answers as through the service."""
    dep = await stack.inference.get_deployment(VLM)
    url = dep.engine_endpoints[0].rstrip("/") + "/v1"
    run = epb.BenchmarkRun(dataset_version=image_sets["multiple_choice"])
    via_endpoint = await run_to_end(stack, evaluation({"base_url": url, "model": dep.served_model_name or "vlm"}, run))
    via_service = await run_to_end(stack, evaluation(VLM, run))
    assert via_endpoint.state == via_service.state == cpb.JOB_STATE_SUCCEEDED, via_endpoint.error
    key = "custom:colours-multiple-choice"
    e = await samples(module_s3, result(via_endpoint, key).predictions_artifact_key)
    s = await samples(module_s3, result(via_service, key).predictions_artifact_key)
    assert [(r["doc_id"], r["extra"]["response"]) for r in e] == [(r["doc_id"], r["extra"]["response"]) for r in s]
    assert [r["extra"]["images_sent"] for r in e] == [1] * ROWS


async def test_a_text_only_model_refuses_an_image_set(stack, image_sets, module_s3, tmp_path):
    text = await register(stack, module_s3, build_tiny_model(tmp_path / "tiny"), "tiny-text")
    err = await _fails(stack.evaluation.create_evaluation(
        evaluation(text, epb.BenchmarkRun(dataset_version=image_sets["multiple_choice"]))), FailedPrecondition)
    assert err.reason == "MODEL_NOT_VISION" and "spec.benchmarks[0].dataset_version" in err.message
    assert "text-only" in err.message
    # A deployment of it too (refused from its registry version; it need not be READY yet).
    await stack.inference.deploy(ipb.Deployment(model_version=text, engine=ipb.ENGINE_TRANSFORMERS),
                                 deployment_id="text-only")  # fmt: skip
    try:
        err = await _fails(stack.evaluation.create_evaluation(
            evaluation("deployments/text-only", epb.BenchmarkRun(dataset_version=image_sets["qa"]))), FailedPrecondition)
        assert err.reason == "MODEL_NOT_VISION" and "deployments/text-only" in err.message
    finally:
        await stack.inference.undeploy("deployments/text-only")
    listed = [e async for e in stack.evaluation.iter_evaluations(filter='deployment = "deployments/text-only"')]
    assert listed == []  # nothing was queued


async def test_a_row_whose_image_cannot_be_loaded_is_named(stack, vlm, tmp_path):
    archive = write_shape_eval_set(tmp_path / "broken", 4, seed=9)
    broken = tmp_path / "broken-set.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"\x89PNG\r\n\x1a\ntruncated" if item.filename == "images/0002.png" else data)
    rows = [json.loads(line) for line in (tmp_path / "broken" / "data.jsonl").read_text().splitlines()]
    row = next(i + 1 for i, r in enumerate(rows) if r["images"] == ["images/0002.png"])
    try:
        dataset = await stack.registry.upload_dataset(broken, parent="datasets/broken-colours")
    except InvalidArgument as refused:  # the registry reads every image at upload
        assert f"row {row}" in refused.message or any(f"[{row}]" in v.field or f"row {row}" in v.field
                                                       for v in refused.violations), refused.message
        return
    ev = await run_to_end(stack, evaluation(VLM, epb.BenchmarkRun(dataset_version=dataset.name)))
    assert ev.state == cpb.JOB_STATE_FAILED
    err = error_from_status(ev.error)
    assert err.reason == "EVAL_SET_IMAGE_INVALID" and f"[row {row}].images[0]" in err.message, err.message


async def _fails(call, error):
    with pytest.raises(error) as info:
        await call
    return info.value
