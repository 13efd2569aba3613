"""``yard quantize`` and ``yard jobs`` on quantization jobs, through real gRPC on loopback.

The CLI talks to a grpc.aio server on port 0 serving small in-test implementations of the quantization,
training and registry services: this tests the CLI (arguments -> request fields, output, errors, dispatch);
the quantization service itself has its own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from typer.testing import CliRunner

from cli.main import app
from cli.quantization_cmds import lineage_quality_line, lineage_quantization_line, quality_text
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.quantization.v1 import quantization_pb2_grpc
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc
from modelyard.training.v1 import training_pb2 as tpb
from modelyard.training.v1 import training_pb2_grpc
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.interceptors import ErrorInterceptor
from services.core.status import to_status_proto

GIB = 2**30
QUALITY = {"source_perplexity": 12.34, "quantized_perplexity": 12.80, "top1_agreement": 0.971, "eval_tokens": 2048}


class FakeQuantization(quantization_pb2_grpc.QuantizationServiceServicer):
    """Jobs in a dict. A job whose id starts with ``fail`` fails when watched; others succeed."""

    def __init__(self) -> None:
        self.creates: list[qpb.CreateQuantizationJobRequest] = []
        self.calls: list[str] = []
        self.jobs: dict[str, qpb.QuantizationJob] = {}

    async def CreateQuantizationJob(self, request, context):
        self.creates.append(request)
        spec = qpb.QuantizationJobSpec()
        spec.CopyFrom(request.quantization_job.spec)
        if spec.source_model_version.startswith("models/bad/"):
            raise InvalidArgument("spec.bits: AWQ takes 4 bits only", reason="UNSUPPORTED_BITS",
                                  violations=[FieldViolation("spec.bits", "AWQ takes 4 bits only")])
        spec.bits = spec.bits or 4
        spec.output_model = spec.output_model or spec.source_model_version.split("/versions/")[0] + "-awq"
        job = qpb.QuantizationJob(
            name=f"quantizationJobs/{request.quantization_job_id or 'generated-1'}", spec=spec,
            display_name=request.quantization_job.display_name,
            preflight=qpb.QuantizationPreflight(
                accelerator="cpu", estimated_memory_bytes=3 * GIB, available_memory_bytes=64 * GIB,
                parameter_count=135_000_000, source_size_bytes=540 * 2**20, expected_size_bytes=135 * 2**20,
                unquantized_layers=["lm_head"], format="compressed-tensors"))
        if request.validate_only:
            return job
        job.state = cpb.JOB_STATE_QUEUED
        job.create_time.GetCurrentTime()
        self.jobs[job.name] = job
        return job

    def _job(self, name: str) -> qpb.QuantizationJob:
        if name not in self.jobs:
            raise NotFound(f"{name} not found", reason="JOB_NOT_FOUND")
        return self.jobs[name]

    async def GetQuantizationJob(self, request, context):
        self.calls.append(f"get {request.name}")
        return self._job(request.name)

    async def ListQuantizationJobs(self, request, context):
        self.calls.append(f"list {request.filter}")
        return qpb.ListQuantizationJobsResponse(quantization_jobs=list(self.jobs.values()))

    async def CancelQuantizationJob(self, request, context):
        self.calls.append(f"cancel {request.name}")
        job = self._job(request.name)
        job.state = cpb.JOB_STATE_CANCELLED
        return job

    async def WatchQuantizationJob(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        self.calls.append(f"watch {request.name}")
        job = self._job(request.name)
        events = [
            cpb.JobEvent(state_change=cpb.JobStateChange(state=cpb.JOB_STATE_RUNNING)),
            cpb.JobEvent(metrics=cpb.JobMetrics(values={"progress_fraction": 0.5})),
            cpb.JobEvent(log=cpb.JobLogLine(line="quantizing the model")),
        ]
        if request.name.startswith("quantizationJobs/fail"):
            error = to_status_proto(InvalidArgument("calibration ran out of memory", reason="OUT_OF_MEMORY"))
            job.error.CopyFrom(error)
            job.state = cpb.JOB_STATE_FAILED
            events.append(cpb.JobEvent(state_change=cpb.JobStateChange(state=cpb.JOB_STATE_FAILED, error=error)))
        else:
            job.state = cpb.JOB_STATE_SUCCEEDED
            job.progress.fraction = 1.0
            job.outputs.CopyFrom(qpb.QuantizationJobOutputs(
                model_version="models/smol-awq/versions/v1", size_bytes=135 * 2**20, source_size_bytes=540 * 2**20,
                quality=qpb.QuantizationQuality(**QUALITY), unquantized_layers=["lm_head"],
                library_versions={"llmcompressor": "0.14.0.1"}, format="compressed-tensors",
                verified_with="transformers"))
            events += [cpb.JobEvent(log=cpb.JobLogLine(line="version registered models/smol-awq/versions/v1")),
                       cpb.JobEvent(state_change=cpb.JobStateChange(state=cpb.JOB_STATE_SUCCEEDED))]
        for seq, event in enumerate(events, start=1):
            event.sequence = seq
            yield event


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    """Knows one job, ``trainingJobs/tuned``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def GetTrainingJob(self, request, context):
        self.calls.append(f"get {request.name}")
        if request.name != "trainingJobs/tuned":
            raise NotFound(f"{request.name} not found", reason="JOB_NOT_FOUND")
        return tpb.TrainingJob(name=request.name, state=cpb.JOB_STATE_SUCCEEDED, spec=tpb.TrainingJobSpec(
            base_model_version="models/smol/versions/v1", method=tpb.TRAINING_METHOD_LORA))

    async def ListTrainingJobs(self, request, context):
        self.calls.append("list")
        job = await self.GetTrainingJob(tpb.GetTrainingJobRequest(name="trainingJobs/tuned"), context)
        return tpb.ListTrainingJobsResponse(training_jobs=[job])


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    async def GetModelVersion(self, request, context):
        parameters = struct_pb2.Struct()
        parameters.update({"method": "gptq", "bits": 4, "group_size": 64, "format": "compressed-tensors",
                           "library_versions": {"llmcompressor": "0.14.0.1"}, "quality": QUALITY})
        return rpb.ModelVersion(name=request.name, kind=rpb.MODEL_KIND_QUANTIZED, lineage=rpb.Lineage(
            base_model_version="models/smol/versions/v1", job="quantizationJobs/q1", parameters=parameters))


class Servers:
    def __init__(self) -> None:
        self.quantization, self.training, self.registry = FakeQuantization(), FakeTraining(), FakeRegistry()
        self.env: dict[str, str] = {}
        self.runner = CliRunner()

    async def yard(self, *args: str, env: dict[str, str] | None = None) -> Any:
        """``yard ARGS`` in a thread (the command runs its own event loop), with the servers' addresses."""
        return await asyncio.to_thread(self.runner.invoke, app, list(args), env={**self.env, **(env or {})})


async def _serve(*adds) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor("test")])
    for add in adds:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    quant_server, quant_addr = await _serve(
        lambda srv: quantization_pb2_grpc.add_QuantizationServiceServicer_to_server(s.quantization, srv),
        lambda srv: registry_pb2_grpc.add_RegistryServiceServicer_to_server(s.registry, srv))
    training_server, training_addr = await _serve(
        lambda srv: training_pb2_grpc.add_TrainingServiceServicer_to_server(s.training, srv))
    s.env = {"YARD_QUANTIZATION_ADDR": quant_addr, "YARD_TRAINING_ADDR": training_addr,
             "YARD_REGISTRY_ADDR": quant_addr}
    yield s
    await quant_server.stop(None)
    await training_server.stop(None)


METHODS = {
    "awq": qpb.QUANTIZATION_METHOD_AWQ,
    "gptq": qpb.QUANTIZATION_METHOD_GPTQ,
    "int8": qpb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
    "fp8": qpb.QUANTIZATION_METHOD_FP8_DYNAMIC,
    "w8a8": qpb.QUANTIZATION_METHOD_W8A8_INT8,
    "bnb-nf4": qpb.QUANTIZATION_METHOD_BNB_4BIT,
    "bnb-int8": qpb.QUANTIZATION_METHOD_BNB_8BIT,
}


async def test_every_method_maps_to_its_enum_and_short_names_are_made_full(servers):
    for method, enum in METHODS.items():
        result = await servers.yard("quantize", "smol/v1", "--method", method, "--job-id", f"j-{method}")
        assert result.exit_code == 0, result.output
        assert f"queued quantizationJobs/j-{method}" in result.output
        request = servers.quantization.creates[-1]
        assert request.quantization_job.spec.method == enum, method
        assert request.quantization_job.spec.source_model_version == "models/smol/versions/v1"
        assert request.quantization_job_id == f"j-{method}" and not request.validate_only
    assert len(servers.quantization.creates) == len(METHODS)


async def test_every_option_lands_in_its_field(servers):
    result = await servers.yard(
        "quantize", "models/smol/versions/v2", "--method", "gptq", "--backend", "gptqmodel", "--bits", "8",
        "--group-size", "-1", "--calibration-dataset", "chat/v3", "--samples", "32", "--seq-len", "256",
        "--output-model", "smol-small", "--merge-adapter", "--display-name", "small smol")
    assert result.exit_code == 0, result.output
    request = servers.quantization.creates[-1]
    spec = request.quantization_job.spec
    assert spec == qpb.QuantizationJobSpec(
        source_model_version="models/smol/versions/v2", method=qpb.QUANTIZATION_METHOD_GPTQ,
        backend=qpb.QUANTIZATION_BACKEND_GPTQMODEL, bits=8, group_size=-1,
        calibration_dataset_version="datasets/chat/versions/v3", calibration_samples=32, calibration_max_length=256,
        output_model="models/smol-small", merge_adapter=True)
    assert request.quantization_job.display_name == "small smol" and request.quantization_job_id == ""
    assert "queued quantizationJobs/generated-1" in result.output

    full = await servers.yard("quantize", "smol/v1", "--method", "awq", "--backend", "autoawq",
                              "--calibration-dataset", "datasets/chat/versions/v1", "--output-model", "models/x")
    assert full.exit_code == 0, full.output
    spec = servers.quantization.creates[-1].quantization_job.spec
    assert spec.calibration_dataset_version == "datasets/chat/versions/v1" and spec.output_model == "models/x"
    assert spec.backend == qpb.QUANTIZATION_BACKEND_AUTOAWQ and spec.bits == 0 and spec.group_size == 0


async def test_dry_run_sends_validate_only_and_prints_the_resolved_spec_and_preflight(servers):
    result = await servers.yard("quantize", "smol/v1", "--method", "awq", "--dry-run")
    assert result.exit_code == 0, result.output
    assert servers.quantization.creates[-1].validate_only
    assert servers.quantization.jobs == {}  # nothing queued
    out = result.output
    assert "awq 4-bit" in out  # the bits the service resolved
    assert "models/smol-awq" in out and "built-in calibration text" in out
    assert "~3.00 GiB of 64.00 GiB" in out and "135.0 MiB (0.25x)" in out
    assert "compressed-tensors" in out and "lm_head" in out and "Traceback" not in out

    as_json = await servers.yard("quantize", "smol/v1", "--method", "awq", "--dry-run", "-o", "json")
    assert as_json.exit_code == 0 and '"expected_size_bytes": "141557760"' in as_json.output


async def test_a_refused_job_prints_the_message_and_the_field_without_a_traceback(servers):
    result = await servers.yard("quantize", "bad/v1", "--method", "awq", "--bits", "8")
    assert result.exit_code == 1
    assert "AWQ takes 4 bits only" in result.output and "UNSUPPORTED_BITS" in result.output
    assert "spec.bits: AWQ takes 4 bits only" in result.output and "Traceback" not in result.output

    for args in (["smol", "--method", "awq"], ["smol/v1", "--method", "q4"], ["smol/v1", "--method", "awq",
                                                                              "--backend", "llama.cpp"]):
        usage = await servers.yard("quantize", *args)
        assert usage.exit_code == 1 and "error:" in usage.output and "Traceback" not in usage.output, args
    assert len(servers.quantization.creates) == 1  # a usage error sends nothing

    down = await servers.yard("quantize", "smol/v1", "--method", "awq",
                              env={"YARD_QUANTIZATION_ADDR": "127.0.0.1:1"})
    assert down.exit_code == 1 and "quantization service at 127.0.0.1:1 is unavailable" in down.output


async def test_watch_prints_the_outputs_and_the_quality_line(servers):
    result = await servers.yard("quantize", "smol/v1", "--method", "awq", "--job-id", "ok", "--watch")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "queued quantizationJobs/ok" in out and "succeeded" in out
    assert "model version: models/smol-awq/versions/v1" in out
    assert "size: 135.0 MiB, source 540.0 MiB (0.25x)" in out
    assert "quality: perplexity 12.34 -> 12.80 (+3.7%), top-1 agreement 97.1% on 2,048 tokens" in out
    assert "format: compressed-tensors" in out and "verified with: transformers" in out
    assert "unquantized layers: lm_head" in out and "libraries: llmcompressor 0.14.0.1" in out


async def test_watch_exits_1_with_the_error_of_a_failed_job(servers):
    result = await servers.yard("quantize", "smol/v1", "--method", "awq", "--job-id", "fail-1", "--watch")
    assert result.exit_code == 1
    assert "quantizationJobs/fail-1 failed: calibration ran out of memory [OUT_OF_MEMORY]" in result.output
    assert "quality:" not in result.output and "Traceback" not in result.output


async def test_jobs_commands_dispatch_on_the_name(servers):
    assert (await servers.yard("quantize", "smol/v1", "--method", "gptq", "--job-id", "q1")).exit_code == 0

    shown = await servers.yard("jobs", "show", "quantizationJobs/q1")
    assert shown.exit_code == 0, shown.output
    assert "quantizationJobs/q1" in shown.output and "gptq 4-bit" in shown.output and "queued" in shown.output
    assert servers.training.calls == []  # a quantizationJobs/ name never asks training
    as_json = await servers.yard("jobs", "show", "quantizationJobs/q1", "-o", "json")
    assert '"method": "QUANTIZATION_METHOD_GPTQ"' in as_json.output

    bare = await servers.yard("jobs", "show", "q1")  # not a training job: found in quantization
    assert bare.exit_code == 0 and "quantizationJobs/q1" in bare.output
    assert servers.training.calls == ["get trainingJobs/q1"]
    trained = await servers.yard("jobs", "show", "tuned")
    assert trained.exit_code == 0 and "trainingJobs/tuned" in trained.output and "lora" in trained.output
    missing = await servers.yard("jobs", "show", "nope")
    assert missing.exit_code == 1 and "trainingJobs/nope not found" in missing.output
    assert "JOB_NOT_FOUND" in missing.output and "Traceback" not in missing.output

    watched = await servers.yard("jobs", "watch", "quantizationJobs/q1")
    assert watched.exit_code == 0, watched.output
    assert "quality: perplexity 12.34 -> 12.80" in watched.output
    logs = await servers.yard("jobs", "logs", "q1")
    assert logs.exit_code == 0 and "quantizing the model" in logs.output
    cancelled = await servers.yard("jobs", "cancel", "quantizationJobs/q1")
    assert cancelled.exit_code == 0 and "cancel requested for quantizationJobs/q1" in cancelled.output
    assert servers.quantization.calls[-1] == "cancel quantizationJobs/q1"


async def test_jobs_list_shows_both_services_with_a_kind_column(servers):
    assert (await servers.yard("quantize", "smol/v1", "--method", "w8a8", "--job-id", "q8")).exit_code == 0
    listed = await servers.yard("jobs", "list")
    assert listed.exit_code == 0, listed.output
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in listed.output.splitlines() if "│" in line]
    rows = {row[0]: row[1:3] for row in cells}
    assert rows["q8"] == ["quantize", "w8a8"] and rows["tuned"] == ["train", "lora"]

    only = await servers.yard("jobs", "list", "--service", "quantization", "--method", "w8a8", "-o", "json")
    assert only.exit_code == 0 and '"name": "quantizationJobs/q8"' in only.output and "tuned" not in only.output
    assert servers.quantization.calls[-1] == "list method = QUANTIZATION_METHOD_W8A8_INT8"
    training = await servers.yard("jobs", "list", "--service", "training")
    assert "tuned" in training.output and "q8" not in training.output

    down = await servers.yard("jobs", "list", env={"YARD_QUANTIZATION_ADDR": "127.0.0.1:1"})
    assert down.exit_code == 0 and "tuned" in down.output and "its jobs are not listed" in down.output
    required = await servers.yard("jobs", "list", "--service", "quantization",
                                  env={"YARD_QUANTIZATION_ADDR": "127.0.0.1:1"})
    assert required.exit_code == 1 and "quantization service at 127.0.0.1:1 is unavailable" in required.output


async def test_models_show_prints_the_quality_and_quantization_lines(servers):
    result = await servers.yard("models", "show", "smol-gptq/v1")
    assert result.exit_code == 0, result.output
    assert "quality: perplexity 12.34 -> 12.80 (+3.7%), top-1 agreement 97.1% on 2,048 tokens" in result.output
    assert "quantization: gptq 4-bit group 64, compressed-tensors, llmcompressor 0.14.0.1" in result.output


def test_lineage_lines_print_nothing_for_missing_or_unknown_keys():
    assert lineage_quality_line({}) is None
    assert lineage_quality_line({"quality": "good"}) is None
    assert lineage_quality_line({"quality": {"top1_agreement": 0.9}}) is None
    assert lineage_quality_line({"quality": {"source_perplexity": 10.0, "quantized_perplexity": 9.5}}) == (
        "quality: perplexity 10.00 -> 9.50 (-5.0%)")
    assert lineage_quantization_line({"quality": QUALITY}) is None
    assert lineage_quantization_line({"method": "QUANTIZATION_METHOD_W8A8_INT8", "bits": 8.0, "group_size": -1}) == (
        "quantization: w8a8 8-bit per channel")
    assert lineage_quantization_line({"method": "AWQ", "library_versions": "?"}) == "quantization: awq"
    assert quality_text(8.0, 8.0, 1.0, 0) == "perplexity 8.00 -> 8.00 (+0.0%), top-1 agreement 100.0%"
