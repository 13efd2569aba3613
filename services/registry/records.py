"""Plain records of the registry domain (no proto, no SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from services.core.jobs.records import JobRecord


class ModelKind(StrEnum):
    BASE = "base"
    ADAPTER = "adapter"
    MERGED = "merged"
    QUANTIZED = "quantized"


class ModelFormat(StrEnum):
    SAFETENSORS = "safetensors"
    PEFT_ADAPTER = "peft_adapter"
    GGUF = "gguf"
    AWQ = "awq"
    GPTQ = "gptq"
    COMPRESSED_TENSORS = "compressed_tensors"


class VersionState(StrEnum):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


class Relation(StrEnum):
    BASE_MODEL = "base_model"
    DATASET = "dataset"


@dataclass
class Model:
    name: str
    description: str
    labels: dict[str, str]
    version_count: int
    create_time: datetime
    update_time: datetime


@dataclass
class Lineage:
    base_model_version: str = ""
    dataset_versions: list[str] = field(default_factory=list)
    job: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    source_uri: str = ""


@dataclass
class FileInfo:
    path: str
    size: int
    sha256: str


@dataclass
class EvaluationScore:
    """One metric of one benchmark measured on a version by an evaluation."""

    evaluation: str  # evaluations/{evaluation}
    benchmark: str  # benchmarks/{benchmark}
    metric: str
    value: float
    stderr: float = 0.0  # 0: unknown
    num_samples: int = 0
    create_time: datetime | None = None  # set when recorded


@dataclass
class ModelVersion:
    name: str
    kind: ModelKind
    format: ModelFormat
    state: VersionState
    description: str
    labels: dict[str, str]
    files: list[FileInfo]
    metadata: dict[str, Any]
    lineage: Lineage
    deployed_by: list[str]
    artifact_prefix: str
    create_time: datetime
    update_time: datetime
    scores: list[EvaluationScore] = field(default_factory=list)  # newest evaluation first

    @property
    def parameter_count(self) -> int:
        return int(self.metadata.get("parameter_count", 0))

    @property
    def total_size_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class ModelImport:
    """An import: a job of the shared runtime (state, progress, error, times, attempts) plus what it imports."""

    job: JobRecord
    source_uri: str
    model_version: str
    stage: str  # queued, fetching, converting, validating, uploading, done


@dataclass
class Dataset:
    name: str
    description: str
    labels: dict[str, str]
    version_count: int
    create_time: datetime


@dataclass
class DatasetVersion:
    name: str
    filename: str
    sha256: str
    size_bytes: int
    format: str
    row_count: int
    invalid_row_count: int
    description: str
    labels: dict[str, str]
    artifact_key: str
    create_time: datetime
    image_count: int = 0  # images the rows refer to (image+text datasets)


@dataclass
class LineageNode:
    name: str
    type: str  # model_version | dataset_version
    kind: ModelKind | None
    job: str
    deleted: bool


@dataclass
class LineageEdge:
    parent: str
    child: str
    relation: Relation
    job: str


@dataclass
class LineageGraph:
    nodes: list[LineageNode]
    edges: list[LineageEdge]
