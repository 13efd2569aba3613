"""The SDK package on its own: installs and imports without the ML stack, retry policy, generator safety."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from modelyard.client import is_safe_to_retry
from modelyard.inference.v1 import inference_pb2
from modelyard.registry.v1 import registry_pb2
from modelyard.training.v1 import training_pb2
from scripts import gen_protos

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "peft", "trl")
# Everything the server extra brings: the SDK and the CLI's remote commands need none of it.
SERVER_ONLY = HEAVY + ("sqlalchemy", "minio", "nanio", "fastapi", "starlette", "uvicorn", "prometheus_client",
                       "tokenizers", "safetensors", "gguf", "huggingface_hub", "accelerate", "datasets", "pyarrow",
                       "numpy", "psycopg", "grpc_reflection", "grpc_status", "cryptography")

BLOCKING_IMPORT = textwrap.dedent("""
    import importlib, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    for module in sys.argv[2:]:
        importlib.import_module(module)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("imported", *sys.argv[2:])
""")


def _import_blocking(blocked: tuple[str, ...], *modules: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKING_IMPORT, ",".join(blocked), *modules], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sdk_imports_with_torch_transformers_deepspeed_peft_trl_blocked():
    done = _import_blocking(HEAVY, "modelyard.client")
    assert done.returncode == 0, done.stderr
    assert "imported modelyard.client" in done.stdout


def test_sdk_and_cli_import_with_every_server_only_package_blocked():
    done = _import_blocking(SERVER_ONLY, "modelyard.client", "cli.main", "cli.output")
    assert done.returncode == 0, done.stderr


def test_the_block_is_real():
    """The hook does stop an import: the checks above could not pass by never blocking anything."""
    done = _import_blocking(("yaml",), "cli.output")
    assert done.returncode != 0
    assert "blocked: yaml" in done.stderr


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_base_dependencies_leave_the_ml_stack_to_the_server_extra():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    server = {_requirement_name(r) for r in project["optional-dependencies"]["server"]}
    heavy = {"torch", "transformers", "deepspeed", "peft", "trl", "accelerate", "datasets", "pyarrow"}
    assert not base & heavy
    assert heavy <= server
    assert {"grpcio", "protobuf", "googleapis-common-protos", "typer", "rich"} <= base


@pytest.mark.parametrize(("method", "safe"), [
    ("GetModelVersion", True), ("ListModels", True), ("GetLineage", True), ("GetDownloadUrls", True),
    ("ValidateDataset", True), ("WatchImport", True), ("WatchTrainingJob", True), ("DownloadFile", True),
    ("Tokenize", True), ("SetDeploymentMarker", True),
    ("CreateModel", False), ("ImportModel", False), ("UploadDataset", False), ("DeleteModelVersion", False),
    ("CancelImport", False), ("CancelTrainingJob", False), ("CreateTrainingJob", False), ("MergeAdapter", False),
    ("Deploy", False), ("Undeploy", False), ("Chat", False), ("Complete", False), ("Embed", False),
    ("RegisterDerivedVersion", False), ("UpdateModel", False), ("LoadAdapter", False),
])
def test_only_calls_safe_to_repeat_are_retried(method, safe):
    assert is_safe_to_retry(method) is safe


@pytest.mark.parametrize("module", [registry_pb2, training_pb2, inference_pb2])
def test_every_rpc_has_a_client_method(module):
    from modelyard.client import InferenceClient, RegistryClient, TrainingClient

    clients = {"RegistryService": RegistryClient, "TrainingService": TrainingClient,
               "InferenceService": InferenceClient}
    for service in module.DESCRIPTOR.services_by_name.values():
        client = clients[service.name]
        for method in service.methods:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", method.name).lower()
            assert callable(getattr(client, snake, None)), f"{client.__name__} has no {snake} ({method.name})"
            if method.name.startswith("List"):
                assert callable(getattr(client, "iter_" + snake.removeprefix("list_"), None)), method.name


def test_generator_keeps_the_hand_written_sdk(tmp_path):
    """`make proto` neither deletes modelyard/client nor reports it as stale."""
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    assert gen_protos.main(["--root", str(tmp_path)]) == 0
    sdk = tmp_path / "modelyard" / "client"
    sdk.mkdir()
    (sdk / "__init__.py").write_text('"""hand-written"""\n')
    (sdk / "README.md").write_text("docs\n")
    assert gen_protos.main(["--check", "--root", str(tmp_path)]) == 0
    assert gen_protos.main(["--root", str(tmp_path)]) == 0
    assert (sdk / "__init__.py").read_text() == '"""hand-written"""\n'
    assert (sdk / "README.md").exists()
    (tmp_path / "modelyard" / "stale").mkdir()
    (tmp_path / "modelyard" / "stale" / "old_pb2.py").write_text("")
    assert gen_protos.main(["--check", "--root", str(tmp_path)]) == 1  # a real stray file is still flagged
