"""The quantization service through real gRPC: in-process registry, training and quantization servers on
port 0, a real nanio S3 server, real SQLite, job children running the real quantizers (llm-compressor,
GPTQModel, AutoAWQ in .venv-quant) on tiny models (CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from cli.demo_models import build_tiny_model
from cli.main import app as cli_app
from modelyard.client import FailedPrecondition, InferenceClient, InvalidArgument, NotFound
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.settings import GrpcServerSettings
from services.inference.app import build_app as build_inference
from services.inference.settings import InferenceSettings
from services.quantization.job import registered_before
from tests.support.quantization_stack import NEEDS_VLLM_W4A16, quant_job, quantization_stack, wait_job
from tests.support.training_stack import fails, import_model, lora_job, upload_dataset, wait_state

DATA = Path(__file__).resolve().parents[1] / "data"
TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}
M = qpb  # enum values: M.QUANTIZATION_METHOD_GPTQ ...


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """hidden 128, head_dim 64: every layer's input size is a multiple of 128 (and vLLM has kernels for it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=128, head_dim=64)


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory) -> Path:
    """hidden 96 (like SmolLM2's 576, not a multiple of 64 or 128): auto group size 32."""
    return build_tiny_model(tmp_path_factory.mktemp("odd") / "model", hidden=96, head_dim=32)


@NEEDS_VLLM_W4A16  # the job checks its GPTQ output in vLLM
async def test_gptq_job_streams_progress_and_registers_a_smaller_quantized_version_with_quality(
        tmp_path, s3_settings, tiny_model):
    """Checked in vLLM too (verify_engine=vllm): the result loads in the engine that serves it and answers."""
    async with quantization_stack(tmp_path, s3_settings, verify_engine="vllm") as stack:
        base = await import_model(stack.registry, tiny_model)
        job = await stack.quantization.create_quantization_job(
            quant_job(base, M.QUANTIZATION_METHOD_GPTQ, output_model="models/tiny-gptq"), quantization_job_id="gptq-1")
        assert job.preflight.verify_engine == "vllm"
        assert (job.name, job.state) == ("quantizationJobs/gptq-1", cpb.JOB_STATE_QUEUED)
        assert (job.spec.bits, job.spec.group_size, job.spec.backend) == (
            4, 128, qpb.QUANTIZATION_BACKEND_LLM_COMPRESSOR)
        assert job.preflight.format == "compressed-tensors" and job.preflight.accelerator == "cpu"
        assert 0 < job.preflight.expected_size_bytes < job.preflight.source_size_bytes
        fractions, states, logs = [], [], []
        async for event in stack.quantization.watch_quantization_job(job.name, timeout=300):
            which = event.WhichOneof("payload")
            if which == "state_change":
                states.append(event.state_change.state)
            elif which == "log":
                logs.append(event.log.line)
            elif which == "metrics" and "progress_fraction" in event.metrics.values:
                fractions.append(event.metrics.values["progress_fraction"])
        assert states[0] == cpb.JOB_STATE_QUEUED and states[-1] == cpb.JOB_STATE_SUCCEEDED, (states, logs)
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert all(any(m in line for line in logs) for m in ("source scored", "quantized model scored", "vLLM check",
                                                          "version registered")), logs
        done = await stack.quantization.get_quantization_job(job.name)
        out = done.outputs
        assert out.model_version.startswith("models/tiny-gptq/versions/") and out.format == "compressed-tensors"
        assert 0 < out.size_bytes < out.source_size_bytes and out.verified_with == "vllm"
        assert out.quality.source_perplexity > 1 and out.quality.quantized_perplexity > 1
        assert 0.5 < out.quality.top1_agreement <= 1.0 and out.quality.eval_tokens > 100
        assert out.library_versions["llmcompressor"] and out.library_versions["transformers"]
        assert "autoawq" not in out.library_versions and "gptqmodel" not in out.library_versions
        version = await stack.registry.get_model_version(out.model_version)
        assert version.kind == rpb.MODEL_KIND_QUANTIZED and version.format == rpb.MODEL_FORMAT_COMPRESSED_TENSORS
        assert version.lineage.base_model_version == base and version.lineage.job == job.name
        params = version.lineage.parameters
        assert params["method"] == "gptq" and params["bits"] == 4 and params["group_size"] == 128
        assert params["calibration"]["dataset_version"] == "builtin" and params["calibration"]["samples"] == 16
        assert params["quality"]["top1_agreement"] == pytest.approx(out.quality.top1_agreement)
        assert params["library_versions"]["compressed-tensors"]
        # A retried attempt (say, killed after registering) finds the version by the job's label, not a second one.
        spec = (await asyncio.to_thread(stack.app.jobs.store.get, job.name)).spec
        assert await asyncio.to_thread(registered_before, spec, "gptq-1") == out.model_version
        assert await asyncio.to_thread(registered_before, spec, "other-job") is None


async def _run(stack, job: qpb.QuantizationJob, job_id: str = "") -> qpb.QuantizationJob:
    created = await stack.quantization.create_quantization_job(job, quantization_job_id=job_id)
    return await wait_job(stack.quantization, created.name, TERMINAL, timeout=600)


@pytest.mark.parametrize(("method", "backend", "bits", "group", "fmt", "vformat", "factor"), [
    (M.QUANTIZATION_METHOD_W8A8_INT8, 0, 8, -1, "compressed-tensors", rpb.MODEL_FORMAT_COMPRESSED_TENSORS, 0.9),
    (M.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY, 0, 8, -1, "compressed-tensors", rpb.MODEL_FORMAT_COMPRESSED_TENSORS, 0.9),
    (M.QUANTIZATION_METHOD_FP8_DYNAMIC, 0, 8, -1, "compressed-tensors", rpb.MODEL_FORMAT_COMPRESSED_TENSORS, 0.9),
    (M.QUANTIZATION_METHOD_AWQ, 0, 4, 128, "compressed-tensors", rpb.MODEL_FORMAT_COMPRESSED_TENSORS, 0.8),
    (M.QUANTIZATION_METHOD_GPTQ, qpb.QUANTIZATION_BACKEND_GPTQMODEL, 4, 128, "gptq", rpb.MODEL_FORMAT_GPTQ, 0.8),
], ids=["w8a8", "int8", "fp8", "awq", "gptqmodel"])
async def test_each_method_registers_its_format_smaller_than_the_source(
        tmp_path, s3_settings, tiny_model, method, backend, bits, group, fmt, vformat, factor):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        done = await _run(stack, quant_job(base, method, backend=backend))
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        assert (done.spec.bits, done.spec.group_size, done.outputs.format) == (bits, group, fmt)
        out = done.outputs
        assert out.size_bytes < factor * out.source_size_bytes, (out.size_bytes, out.source_size_bytes)
        assert out.quality.top1_agreement > 0.5 and out.verified_with == "transformers"
        version = await stack.registry.get_model_version(out.model_version)
        assert version.kind == rpb.MODEL_KIND_QUANTIZED and version.format == vformat
        assert out.model_version.startswith("models/tiny-") and version.lineage.base_model_version == base


async def test_preflight_refuses_bad_requests_naming_the_field_and_queues_nothing(
        tmp_path, s3_settings, tiny_model, odd_model):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        q = stack.quantization

        async def refused(error, job, field="", reason=""):
            err = await fails(q.create_quantization_job(job), error)
            if field:
                assert field in [v.field for v in err.violations], (err.message, err.violations)
            if reason:
                assert err.reason == reason, err
            return err

        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_UNSPECIFIED), "spec.method")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_GPTQ, bits=3), "spec.bits")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_AWQ, bits=8), "spec.bits")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_GPTQ, group_size=100), "spec.group_size")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY, group_size=64),
                      "spec.group_size")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
                                                 calibration_dataset_version="datasets/x/versions/v1"),
                      "spec.calibration_dataset_version")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_W8A8_INT8,
                                                 backend=qpb.QUANTIZATION_BACKEND_AUTOAWQ), "spec.backend")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_GPTQ, group_size=512), "spec.group_size")
        await refused(InvalidArgument, quant_job("tiny/base", M.QUANTIZATION_METHOD_GPTQ), "spec.source_model_version")
        await refused(NotFound, quant_job("models/tiny/versions/nope", M.QUANTIZATION_METHOD_GPTQ),
                      "spec.source_model_version")
        err = await refused(FailedPrecondition, quant_job(base, M.QUANTIZATION_METHOD_BNB_4BIT),
                            reason="HARDWARE_UNSUPPORTED")
        assert "CUDA" in err.message and "bitsandbytes" in err.message and err.metadata["accelerator"] == "cpu"
        await refused(FailedPrecondition, quant_job(base, M.QUANTIZATION_METHOD_BNB_8BIT), reason="HARDWARE_UNSUPPORTED")
        await refused(InvalidArgument, quant_job(base, M.QUANTIZATION_METHOD_GPTQ, merge_adapter=True),
                      "spec.merge_adapter")
        assert not (await q.list_quantization_jobs()).quantization_jobs

        # validate_only: every default resolved, nothing stored. hidden 96: the auto group size is 32.
        odd = await import_model(stack.registry, odd_model, parent="models/odd")
        dry = await q.create_quantization_job(quant_job(odd, M.QUANTIZATION_METHOD_GPTQ), validate_only=True)
        assert dry.state == cpb.JOB_STATE_UNSPECIFIED and dry.spec.group_size == 32
        assert dry.spec.output_model == "models/odd-gptq" and dry.preflight.estimated_memory_bytes > 0
        assert not list(dry.preflight.unquantized_layers)
        dry64 = await q.create_quantization_job(quant_job(odd, M.QUANTIZATION_METHOD_GPTQ, group_size=64),
                                                validate_only=True)
        assert "model.layers.*.self_attn.q_proj" in dry64.preflight.unquantized_layers
        assert "model.layers.*.mlp.down_proj" not in dry64.preflight.unquantized_layers
        assert not (await q.list_quantization_jobs()).quantization_jobs


async def test_group_size_that_divides_only_some_layers_leaves_them_unquantized_and_listed_calibrating_on_a_dataset(
        tmp_path, s3_settings, odd_model):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, odd_model, parent="models/odd")
        chat = await upload_dataset(stack.registry, "datasets/shout", DATA / "training" / "shout_train.jsonl")
        done = await _run(stack, quant_job(base, M.QUANTIZATION_METHOD_GPTQ, group_size=64,
                                           calibration_dataset_version=chat, calibration_samples=8))
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        layers = list(done.outputs.unquantized_layers)
        assert "model.layers.0.self_attn.q_proj" in layers and "model.layers.1.mlp.up_proj" in layers
        assert not any("down_proj" in name for name in layers)
        version = await stack.registry.get_model_version(done.outputs.model_version)
        assert list(version.lineage.dataset_versions) == [chat]
        assert version.lineage.parameters["calibration"]["dataset_version"] == chat
        events = [e async for e in stack.quantization.watch_quantization_job(done.name)]
        lines = [e.log.line for e in events if e.WhichOneof("payload") == "log"]
        assert any("rendered with the chat template" in line and "samples=8" in line for line in lines), lines


async def test_adapter_is_refused_with_a_hint_or_merged_first_never_shipped_unquantized(
        tmp_path, s3_settings, tiny_model):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        chat = await upload_dataset(stack.registry, "datasets/shout", DATA / "training" / "shout_train.jsonl")
        train = await stack.training.create_training_job(lora_job(base, [chat], output_model="models/tiny-shout"))
        trained = await wait_state(stack.training, train.name, TERMINAL, timeout=300)
        assert trained.state == cpb.JOB_STATE_SUCCEEDED, trained.error
        adapter = trained.outputs.model_version
        err = await fails(stack.quantization.create_quantization_job(quant_job(adapter)), FailedPrecondition)
        assert err.reason == "SOURCE_IS_ADAPTER" and "merge" in err.message
        assert err.violations[0].field == "spec.source_model_version"

        done = await _run(stack, quant_job(adapter, M.QUANTIZATION_METHOD_GPTQ, merge_adapter=True))
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        assert done.spec.source_model_version == adapter and done.spec.merge_adapter
        merged = await stack.registry.get_model_version(done.outputs.merged_model_version)
        assert merged.kind == rpb.MODEL_KIND_MERGED and merged.lineage.base_model_version == adapter
        quantized = await stack.registry.get_model_version(done.outputs.model_version)
        assert quantized.kind == rpb.MODEL_KIND_QUANTIZED and quantized.lineage.base_model_version == merged.name
        assert quantized.name.startswith("models/tiny-shout-gptq/versions/")
        assert done.outputs.size_bytes < done.outputs.source_size_bytes
        assert list(quantized.lineage.dataset_versions) == [chat]


async def _wait_log(stack, name: str, text: str) -> None:
    async for event in stack.quantization.watch_quantization_job(name, timeout=300):
        if event.WhichOneof("payload") == "log" and text in event.log.line:
            return
    raise AssertionError(f"{name} ended before logging {text!r}")


def _job_child(job_name: str) -> psutil.Process:
    """The job's child process (python -m services.core.jobs.child, working in the job's directory)."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if "services.core.jobs.child" in " ".join(proc.cmdline()) and job_name in proc.cwd():
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no child process for {job_name}")


async def test_cancel_and_sigkill_leave_no_half_registered_version(tmp_path, s3_settings, tiny_model):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        q = stack.quantization
        # Cancelled while the quantizer starts: CANCELLED, the quantizer process gone, nothing registered.
        job = await q.create_quantization_job(quant_job(base, output_model="models/tiny-cancel"))
        await _wait_log(stack, job.name, "source downloaded")
        await q.cancel_quantization_job(job.name)
        done = await wait_job(q, job.name, TERMINAL, timeout=120)
        assert done.state == cpb.JOB_STATE_CANCELLED and not done.outputs.model_version
        await fails(stack.registry.list_model_versions(parent="models/tiny-cancel"), NotFound)
        assert not [p for p in psutil.Process().children(recursive=True)
                    if "services.quantization.quantizer" in " ".join(p.cmdline())]

        # SIGKILL of the job's process mid-quantization: the attempt is lost, the job retried, and exactly one
        # version registered.
        job = await q.create_quantization_job(quant_job(base, output_model="models/tiny-killed"))
        await _wait_log(stack, job.name, "source scored")
        _job_child(job.name).kill()
        done = await wait_job(q, job.name, TERMINAL, timeout=300)
        assert done.state == cpb.JOB_STATE_SUCCEEDED and done.attempt_count == 2, done.error
        versions = (await stack.registry.list_model_versions(parent="models/tiny-killed")).model_versions
        assert [v.name for v in versions] == [done.outputs.model_version]


@NEEDS_VLLM_W4A16
async def test_autoawq_output_is_checked_and_scored_in_vllm(tmp_path, s3_settings, tiny_model):
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        done = await _run(stack, quant_job(base, M.QUANTIZATION_METHOD_AWQ, backend=qpb.QUANTIZATION_BACKEND_AUTOAWQ,
                                           group_size=64))
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        out = done.outputs
        assert out.format == "awq" and out.verified_with == "vllm" and out.library_versions["autoawq"] == "0.2.9"
        assert out.quality.quantized_perplexity > 1 and out.quality.top1_agreement > 0.5
        version = await stack.registry.get_model_version(out.model_version)
        assert version.format == rpb.MODEL_FORMAT_AWQ and version.kind == rpb.MODEL_KIND_QUANTIZED


async def test_quantized_version_serves_on_the_transformers_engine(tmp_path, s3_settings, tiny_model):
    """compressed-tensors W8A8 and W4A16 load in the transformers engine (.venv has compressed-tensors)."""
    async with quantization_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_model)
        done = await _run(stack, quant_job(base, M.QUANTIZATION_METHOD_W8A8_INT8))
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        app = build_inference(InferenceSettings(
            data_dir=tmp_path / "inference", s3=s3_settings, grpc=GrpcServerSettings(port=0),
            registry_addr=stack.registry_addr, vllm_python=tmp_path / "no-vllm" / "bin" / "python",
            engine_start_timeout_s=180, omp_threads=1), metrics=False, default_port=0)
        await app.start()
        try:
            async with InferenceClient(f"127.0.0.1:{app.server.port}", timeout=180) as inference:
                await inference.deploy(ipb.Deployment(model_version=done.outputs.model_version,
                                                      engine=ipb.ENGINE_TRANSFORMERS), deployment_id="tiny-w8a8")
                for _ in range(900):
                    d = await inference.get_deployment("deployments/tiny-w8a8")
                    if d.state in (ipb.DEPLOYMENT_STATE_READY, ipb.DEPLOYMENT_STATE_FAILED):
                        break
                    await asyncio.sleep(0.2)
                assert d.state == ipb.DEPLOYMENT_STATE_READY, d.error.message
                chunks = [c async for c in inference.chat(
                    deployment="deployments/tiny-w8a8", messages=[ipb.ChatMessage(role=ipb.CHAT_ROLE_USER, content="hello")],
                    sampling=ipb.SamplingParams(max_tokens=5, temperature=0.0))]
                assert chunks[-1].usage.completion_tokens > 0
        finally:
            await app.stop(grace=1)


async def test_cli_quantize_watches_a_real_job_and_models_show_prints_the_quality(tmp_path, s3_settings, tiny_model):
    """`yard quantize` against the real service: --dry-run, a refusal without a traceback, --watch to the end,
    then `yard models show` prints the quality line and `yard jobs show` finds the job by its id."""
    async with quantization_stack(tmp_path, s3_settings) as stack:
        await import_model(stack.registry, tiny_model)
        env = {"YARD_QUANTIZATION_ADDR": stack.quantization_addr, "YARD_REGISTRY_ADDR": stack.registry_addr,
               "YARD_TRAINING_ADDR": stack.app.settings.training_addr, "COLUMNS": "200"}

        def yard(*args: str):
            return CliRunner().invoke(cli_app, list(args), env=env)

        dry = await asyncio.to_thread(yard, "quantize", "tiny/base", "--method", "w8a8", "--samples", "8",
                                      "--seq-len", "64", "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "compressed-tensors" in dry.output and "w8a8" in dry.output.lower()
        refused = await asyncio.to_thread(yard, "quantize", "tiny/base", "--method", "bnb-nf4")
        assert refused.exit_code != 0 and "HARDWARE_UNSUPPORTED" in refused.output
        assert "Traceback" not in refused.output
        assert not (await stack.quantization.list_quantization_jobs()).quantization_jobs

        done = await asyncio.to_thread(yard, "quantize", "models/tiny/versions/base", "--method", "w8a8", "--samples",
                                       "8", "--seq-len", "64", "--output-model", "tiny-int8", "--job-id", "cli-w8a8",
                                       "--watch")
        assert done.exit_code == 0, done.output
        assert "models/tiny-int8/versions/v1" in done.output and "agreement" in done.output
        shown = await asyncio.to_thread(yard, "models", "show", "tiny-int8/v1")
        assert shown.exit_code == 0, shown.output
        assert "quality: perplexity" in shown.output and "top-1 agreement" in shown.output
        assert "quantization: w8a8 8-bit" in shown.output
        job = await asyncio.to_thread(yard, "jobs", "show", "cli-w8a8")
        assert job.exit_code == 0 and "quantizationJobs/cli-w8a8" in job.output, job.output


async def test_jobs_on_postgresql_queue_cancel_list_and_register(tmp_path, s3_settings, tiny_model, postgres_backend):
    """Registry, training and quantization each on a PostgreSQL database of its own (the tests above run on
    SQLite): a job queued behind a running one is cancelled at once, the running one registers its version, and
    the jobs list, filter and page in SQL."""
    async with quantization_stack(tmp_path, s3_settings, databases=postgres_backend) as stack:
        assert stack.app.settings.database_url.startswith("postgresql+psycopg://")
        base = await import_model(stack.registry, tiny_model)
        q = stack.quantization
        fp8 = quant_job(base, M.QUANTIZATION_METHOD_FP8_DYNAMIC)
        running = await q.create_quantization_job(fp8, quantization_job_id="pg-run")
        await _wait_log(stack, running.name, "source downloaded")  # claimed: the worker's only slot is busy
        queued = await q.create_quantization_job(fp8, quantization_job_id="pg-queued")
        cancelled = await q.cancel_quantization_job(queued.name)
        assert cancelled.state == cpb.JOB_STATE_CANCELLED and cancelled.end_time.seconds > 0
        done = await wait_job(q, running.name, TERMINAL, timeout=600)
        assert done.state == cpb.JOB_STATE_SUCCEEDED and done.attempt_count == 1, done.error
        version = await stack.registry.get_model_version(done.outputs.model_version)
        assert version.kind == rpb.MODEL_KIND_QUANTIZED and version.lineage.job == running.name
        names, token = [], ""
        while True:
            page = await q.list_quantization_jobs(order_by="create_time desc", page_size=1, page_token=token)
            names += [j.name for j in page.quantization_jobs]
            if not (token := page.next_page_token):
                break
        assert names == [queued.name, running.name]
        only = await q.list_quantization_jobs(filter="state = JOB_STATE_CANCELLED")
        assert [j.name for j in only.quantization_jobs] == [queued.name]
