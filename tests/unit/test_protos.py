"""The generated gRPC contracts: importable, AIP-shaped, and guarded by `gen_protos --check`."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

from scripts import gen_protos

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_FILES = gen_protos.proto_files(REPO_ROOT)
SERVICES = {
    "registry": "RegistryService",
    "training": "TrainingService",
    "quantization": "QuantizationService",
    "evaluation": "EvaluationService",
    "inference": "InferenceService",
}
JOB_RESOURCES = [
    ("training", "TrainingJob"),
    ("quantization", "QuantizationJob"),
    ("evaluation", "Evaluation"),
]


def _module_name(proto: str, suffix: str) -> str:
    return proto.removesuffix(".proto").replace("/", ".") + suffix


def _file(proto: str) -> FileDescriptor:
    return importlib.import_module(_module_name(proto, "_pb2")).DESCRIPTOR


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_generated_modules_import(proto: str) -> None:
    pb2 = importlib.import_module(_module_name(proto, "_pb2"))
    importlib.import_module(_module_name(proto, "_pb2_grpc"))
    assert pb2.DESCRIPTOR.name == proto
    assert pb2.DESCRIPTOR.package == proto.rsplit("/", 1)[0].replace("/", ".")


@pytest.mark.parametrize(("service", "service_name"), SERVICES.items())
def test_service_full_names_are_in_the_descriptor_pool(service: str, service_name: str) -> None:
    importlib.import_module(f"modelyard.{service}.v1.{service}_pb2_grpc")
    full_name = f"modelyard.{service}.v1.{service_name}"
    descriptor = descriptor_pool.Default().FindServiceByName(full_name)
    assert descriptor.full_name == full_name
    assert descriptor.methods


def test_every_list_method_pages_filters_and_orders() -> None:
    list_requests = [
        message
        for proto in PROTO_FILES
        for message in _file(proto).message_types_by_name.values()
        if message.name.startswith("List") and message.name.endswith("Request")
    ]
    assert len(list_requests) >= 6
    for request in list_requests:
        fields = request.fields_by_name
        assert fields["page_size"].type == FieldDescriptor.TYPE_INT32, request.full_name
        for field in ("page_token", "filter", "order_by"):
            assert fields[field].type == FieldDescriptor.TYPE_STRING, f"{request.full_name}.{field}"
        response = request.file.message_types_by_name[request.name.removesuffix("Request") + "Response"]
        assert response.fields_by_name["next_page_token"].type == FieldDescriptor.TYPE_STRING, response.full_name


def test_job_resources_share_job_fields() -> None:
    """The shared job runtime fills fields 1-10 by name on any job resource."""
    shapes = []
    for service, resource in JOB_RESOURCES:
        message = _file(f"modelyard/{service}/v1/{service}.proto").message_types_by_name[resource]
        shapes.append([(f.number, f.name) for f in message.fields if f.number <= 10])
        assert message.fields_by_name["state"].enum_type.full_name == "modelyard.common.v1.JobState"
        assert message.fields_by_name["error"].message_type.full_name == "google.rpc.Status"
        assert message.fields_by_name["progress"].message_type.full_name == "modelyard.common.v1.JobProgress"
    assert shapes[0] == shapes[1] == shapes[2]
    assert [name for _, name in shapes[0]][:3] == ["name", "state", "error"]


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("training", "WatchTrainingJob"),
        ("quantization", "WatchQuantizationJob"),
        ("evaluation", "WatchEvaluation"),
        ("inference", "Chat"),
        ("inference", "Complete"),
    ],
)
def test_streaming_methods_are_server_streaming(service: str, method: str) -> None:
    descriptor = _file(f"modelyard/{service}/v1/{service}.proto").services_by_name[SERVICES[service]]
    rpc = descriptor.methods_by_name[method]
    assert rpc.server_streaming and not rpc.client_streaming


def test_unset_sampling_params_differ_from_zero() -> None:
    from modelyard.inference.v1 import inference_pb2

    params = inference_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the protos and the committed generated code, freshly regenerated."""
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    assert gen_protos.main(["--root", str(tmp_path)]) == 0
    return tmp_path


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.gen_protos", "--check", "--root", str(root)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_on_fresh_output_and_detects_an_edited_file(repo_copy: Path) -> None:
    assert _check(repo_copy).returncode == 0

    edited = repo_copy / "modelyard/training/v1/training_pb2.py"
    edited.write_text(edited.read_text() + "# hand edit\n")
    result = _check(repo_copy)

    assert result.returncode == 1
    assert "out of date: modelyard/training/v1/training_pb2.py" in result.stderr
    assert "run `make proto`" in result.stderr


def test_check_detects_missing_and_stale_files(repo_copy: Path) -> None:
    (repo_copy / "modelyard/inference/v1/inference_pb2.pyi").unlink()
    (repo_copy / "modelyard/inference/v1/old_pb2.py").write_text("")

    assert gen_protos.main(["--check", "--root", str(repo_copy)]) == 1


def test_generation_is_deterministic_and_removes_stale_files(repo_copy: Path) -> None:
    before = gen_protos.tree(repo_copy)
    stale = repo_copy / "modelyard/gone/v1/gone_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")

    assert gen_protos.main(["--root", str(repo_copy)]) == 0

    assert gen_protos.tree(repo_copy) == before
    assert not (repo_copy / "modelyard/gone").exists()
