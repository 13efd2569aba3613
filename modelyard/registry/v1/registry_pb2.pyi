import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from modelyard.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_BASE: _ClassVar[ModelKind]
    MODEL_KIND_ADAPTER: _ClassVar[ModelKind]
    MODEL_KIND_MERGED: _ClassVar[ModelKind]
    MODEL_KIND_QUANTIZED: _ClassVar[ModelKind]

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_SAFETENSORS: _ClassVar[ModelFormat]
    MODEL_FORMAT_PEFT_ADAPTER: _ClassVar[ModelFormat]
    MODEL_FORMAT_GGUF: _ClassVar[ModelFormat]
    MODEL_FORMAT_AWQ: _ClassVar[ModelFormat]
    MODEL_FORMAT_GPTQ: _ClassVar[ModelFormat]
    MODEL_FORMAT_COMPRESSED_TENSORS: _ClassVar[ModelFormat]

class ModelVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_VERSION_STATE_UNSPECIFIED: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_CREATING: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_READY: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_FAILED: _ClassVar[ModelVersionState]

class LineageDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEAGE_DIRECTION_UNSPECIFIED: _ClassVar[LineageDirection]
    LINEAGE_DIRECTION_ANCESTORS: _ClassVar[LineageDirection]
    LINEAGE_DIRECTION_DESCENDANTS: _ClassVar[LineageDirection]
    LINEAGE_DIRECTION_BOTH: _ClassVar[LineageDirection]

class LineageRelation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEAGE_RELATION_UNSPECIFIED: _ClassVar[LineageRelation]
    LINEAGE_RELATION_BASE_MODEL: _ClassVar[LineageRelation]
    LINEAGE_RELATION_DATASET: _ClassVar[LineageRelation]

class LineageNodeType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEAGE_NODE_TYPE_UNSPECIFIED: _ClassVar[LineageNodeType]
    LINEAGE_NODE_TYPE_MODEL_VERSION: _ClassVar[LineageNodeType]
    LINEAGE_NODE_TYPE_DATASET_VERSION: _ClassVar[LineageNodeType]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_BASE: ModelKind
MODEL_KIND_ADAPTER: ModelKind
MODEL_KIND_MERGED: ModelKind
MODEL_KIND_QUANTIZED: ModelKind
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_SAFETENSORS: ModelFormat
MODEL_FORMAT_PEFT_ADAPTER: ModelFormat
MODEL_FORMAT_GGUF: ModelFormat
MODEL_FORMAT_AWQ: ModelFormat
MODEL_FORMAT_GPTQ: ModelFormat
MODEL_FORMAT_COMPRESSED_TENSORS: ModelFormat
MODEL_VERSION_STATE_UNSPECIFIED: ModelVersionState
MODEL_VERSION_STATE_CREATING: ModelVersionState
MODEL_VERSION_STATE_READY: ModelVersionState
MODEL_VERSION_STATE_FAILED: ModelVersionState
LINEAGE_DIRECTION_UNSPECIFIED: LineageDirection
LINEAGE_DIRECTION_ANCESTORS: LineageDirection
LINEAGE_DIRECTION_DESCENDANTS: LineageDirection
LINEAGE_DIRECTION_BOTH: LineageDirection
LINEAGE_RELATION_UNSPECIFIED: LineageRelation
LINEAGE_RELATION_BASE_MODEL: LineageRelation
LINEAGE_RELATION_DATASET: LineageRelation
LINEAGE_NODE_TYPE_UNSPECIFIED: LineageNodeType
LINEAGE_NODE_TYPE_MODEL_VERSION: LineageNodeType
LINEAGE_NODE_TYPE_DATASET_VERSION: LineageNodeType

class Model(_message.Message):
    __slots__ = ("name", "description", "labels", "version_count", "create_time", "update_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    version_count: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., version_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("architecture", "model_type", "parameter_count", "dtype", "context_length", "has_chat_template", "total_size_bytes", "task", "embedding_dimensions", "vision")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VISION_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    model_type: str
    parameter_count: int
    dtype: str
    context_length: int
    has_chat_template: bool
    total_size_bytes: int
    task: str
    embedding_dimensions: int
    vision: VisionMetadata
    def __init__(self, architecture: _Optional[str] = ..., model_type: _Optional[str] = ..., parameter_count: _Optional[int] = ..., dtype: _Optional[str] = ..., context_length: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., total_size_bytes: _Optional[int] = ..., task: _Optional[str] = ..., embedding_dimensions: _Optional[int] = ..., vision: _Optional[_Union[VisionMetadata, _Mapping]] = ...) -> None: ...

class VisionMetadata(_message.Message):
    __slots__ = ("vision_model_type", "depth", "hidden_size", "patch_size", "spatial_merge_size", "image_token", "processor_files")
    VISION_MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_MERGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_FILES_FIELD_NUMBER: _ClassVar[int]
    vision_model_type: str
    depth: int
    hidden_size: int
    patch_size: int
    spatial_merge_size: int
    image_token: str
    processor_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vision_model_type: _Optional[str] = ..., depth: _Optional[int] = ..., hidden_size: _Optional[int] = ..., patch_size: _Optional[int] = ..., spatial_merge_size: _Optional[int] = ..., image_token: _Optional[str] = ..., processor_files: _Optional[_Iterable[str]] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("base_model_version", "dataset_versions", "job", "parameters", "source_uri")
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    base_model_version: str
    dataset_versions: _containers.RepeatedScalarFieldContainer[str]
    job: str
    parameters: _struct_pb2.Struct
    source_uri: str
    def __init__(self, base_model_version: _Optional[str] = ..., dataset_versions: _Optional[_Iterable[str]] = ..., job: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., source_uri: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "kind", "format", "state", "description", "labels", "files", "metadata", "lineage", "deployed_by", "artifact_prefix", "create_time", "update_time", "scores")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_BY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelKind
    format: ModelFormat
    state: ModelVersionState
    description: str
    labels: _containers.ScalarMap[str, str]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    metadata: ModelMetadata
    lineage: Lineage
    deployed_by: _containers.RepeatedScalarFieldContainer[str]
    artifact_prefix: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    scores: _containers.RepeatedCompositeFieldContainer[EvaluationScore]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., metadata: _Optional[_Union[ModelMetadata, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., deployed_by: _Optional[_Iterable[str]] = ..., artifact_prefix: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scores: _Optional[_Iterable[_Union[EvaluationScore, _Mapping]]] = ...) -> None: ...

class EvaluationScore(_message.Message):
    __slots__ = ("evaluation", "benchmark", "metric", "value", "stderr", "num_samples", "create_time")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    evaluation: str
    benchmark: str
    metric: str
    value: float
    stderr: float
    num_samples: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, evaluation: _Optional[str] = ..., benchmark: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., stderr: _Optional[float] = ..., num_samples: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("model_id", "model")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model: Model
    def __init__(self, model_id: _Optional[str] = ..., model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter", "order_by")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    order_by: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token", "total_size")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    total_size: int
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model", "update_mask")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    model: Model
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class CreateModelVersionRequest(_message.Message):
    __slots__ = ("parent", "version_id", "model_version")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    parent: str
    version_id: str
    model_version: ModelVersion
    def __init__(self, parent: _Optional[str] = ..., version_id: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class GetModelVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelVersionsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "order_by")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    order_by: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListModelVersionsResponse(_message.Message):
    __slots__ = ("model_versions", "next_page_token", "total_size")
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    total_size: int
    def __init__(self, model_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class UpdateModelVersionRequest(_message.Message):
    __slots__ = ("model_version", "update_mask")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteModelVersionRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RegisterDerivedVersionRequest(_message.Message):
    __slots__ = ("parent", "version_id", "kind", "format", "artifact_prefix", "lineage", "description", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PARENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    version_id: str
    kind: ModelKind
    format: ModelFormat
    artifact_prefix: str
    lineage: Lineage
    description: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, parent: _Optional[str] = ..., version_id: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., artifact_prefix: _Optional[str] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SetDeploymentMarkerRequest(_message.Message):
    __slots__ = ("name", "deployment", "deployed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_FIELD_NUMBER: _ClassVar[int]
    name: str
    deployment: str
    deployed: bool
    def __init__(self, name: _Optional[str] = ..., deployment: _Optional[str] = ..., deployed: _Optional[bool] = ...) -> None: ...

class RecordEvaluationScoresRequest(_message.Message):
    __slots__ = ("name", "evaluation", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    evaluation: str
    scores: _containers.RepeatedCompositeFieldContainer[EvaluationScore]
    def __init__(self, name: _Optional[str] = ..., evaluation: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[EvaluationScore, _Mapping]]] = ...) -> None: ...

class LineageNode(_message.Message):
    __slots__ = ("name", "type", "kind", "job", "deleted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: LineageNodeType
    kind: ModelKind
    job: str
    deleted: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[LineageNodeType, str]] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., job: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class LineageEdge(_message.Message):
    __slots__ = ("parent", "child", "relation", "job")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CHILD_FIELD_NUMBER: _ClassVar[int]
    RELATION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    parent: str
    child: str
    relation: LineageRelation
    job: str
    def __init__(self, parent: _Optional[str] = ..., child: _Optional[str] = ..., relation: _Optional[_Union[LineageRelation, str]] = ..., job: _Optional[str] = ...) -> None: ...

class GetLineageRequest(_message.Message):
    __slots__ = ("name", "direction", "depth")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    direction: LineageDirection
    depth: int
    def __init__(self, name: _Optional[str] = ..., direction: _Optional[_Union[LineageDirection, str]] = ..., depth: _Optional[int] = ...) -> None: ...

class GetLineageResponse(_message.Message):
    __slots__ = ("nodes", "edges")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[LineageNode]
    edges: _containers.RepeatedCompositeFieldContainer[LineageEdge]
    def __init__(self, nodes: _Optional[_Iterable[_Union[LineageNode, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[LineageEdge, _Mapping]]] = ...) -> None: ...

class ModelImport(_message.Message):
    __slots__ = ("name", "state", "error", "progress", "create_time", "start_time", "end_time", "attempt_count", "source_uri", "model_version", "stage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _common_pb2.JobState
    error: _status_pb2.Status
    progress: _common_pb2.JobProgress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempt_count: int
    source_uri: str
    model_version: str
    stage: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., source_uri: _Optional[str] = ..., model_version: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class ImportModelRequest(_message.Message):
    __slots__ = ("parent", "version_id", "source_uri", "description", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PARENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    version_id: str
    source_uri: str
    description: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, parent: _Optional[str] = ..., version_id: _Optional[str] = ..., source_uri: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetImportRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListImportsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter", "order_by")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    order_by: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListImportsResponse(_message.Message):
    __slots__ = ("model_imports", "next_page_token", "total_size")
    MODEL_IMPORTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_imports: _containers.RepeatedCompositeFieldContainer[ModelImport]
    next_page_token: str
    total_size: int
    def __init__(self, model_imports: _Optional[_Iterable[_Union[ModelImport, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class WatchImportRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class CancelImportRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadUrl(_message.Message):
    __slots__ = ("file", "url")
    FILE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    file: FileEntry
    url: str
    def __init__(self, file: _Optional[_Union[FileEntry, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...

class GetDownloadUrlsRequest(_message.Message):
    __slots__ = ("name", "expires_seconds", "verify_checksums")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    expires_seconds: int
    verify_checksums: bool
    def __init__(self, name: _Optional[str] = ..., expires_seconds: _Optional[int] = ..., verify_checksums: _Optional[bool] = ...) -> None: ...

class GetDownloadUrlsResponse(_message.Message):
    __slots__ = ("urls",)
    URLS_FIELD_NUMBER: _ClassVar[int]
    urls: _containers.RepeatedCompositeFieldContainer[DownloadUrl]
    def __init__(self, urls: _Optional[_Iterable[_Union[DownloadUrl, _Mapping]]] = ...) -> None: ...

class DownloadFileRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DownloadFileResponse(_message.Message):
    __slots__ = ("file", "chunk")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    file: FileEntry
    chunk: bytes
    def __init__(self, file: _Optional[_Union[FileEntry, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "description", "labels", "version_count", "create_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    version_count: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., version_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TokenStats(_message.Message):
    __slots__ = ("rows", "min_tokens", "mean_tokens", "max_tokens", "rows_over_max_length", "max_length", "images", "max_images_per_row", "image_tokens")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_OVER_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    rows_over_max_length: int
    max_length: int
    images: int
    max_images_per_row: int
    image_tokens: int
    def __init__(self, rows: _Optional[int] = ..., min_tokens: _Optional[int] = ..., mean_tokens: _Optional[float] = ..., max_tokens: _Optional[int] = ..., rows_over_max_length: _Optional[int] = ..., max_length: _Optional[int] = ..., images: _Optional[int] = ..., max_images_per_row: _Optional[int] = ..., image_tokens: _Optional[int] = ...) -> None: ...

class RowError(_message.Message):
    __slots__ = ("row", "field", "reason")
    ROW_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    row: int
    field: str
    reason: str
    def __init__(self, row: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DatasetVersion(_message.Message):
    __slots__ = ("name", "filename", "sha256", "size_bytes", "format", "row_count", "invalid_row_count", "description", "labels", "artifact_key", "create_time", "image_count")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    INVALID_ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    filename: str
    sha256: str
    size_bytes: int
    format: str
    row_count: int
    invalid_row_count: int
    description: str
    labels: _containers.ScalarMap[str, str]
    artifact_key: str
    create_time: _timestamp_pb2.Timestamp
    image_count: int
    def __init__(self, name: _Optional[str] = ..., filename: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., format: _Optional[str] = ..., row_count: _Optional[int] = ..., invalid_row_count: _Optional[int] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., artifact_key: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., image_count: _Optional[int] = ...) -> None: ...

class DatasetUploadMetadata(_message.Message):
    __slots__ = ("parent", "version_id", "filename", "expected_format", "description", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PARENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    version_id: str
    filename: str
    expected_format: str
    description: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, parent: _Optional[str] = ..., version_id: _Optional[str] = ..., filename: _Optional[str] = ..., expected_format: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: DatasetUploadMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[DatasetUploadMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter", "order_by")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    order_by: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token", "total_size")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    total_size: int
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class GetDatasetVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDatasetVersionsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "order_by")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    order_by: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListDatasetVersionsResponse(_message.Message):
    __slots__ = ("dataset_versions", "next_page_token", "total_size")
    DATASET_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset_versions: _containers.RepeatedCompositeFieldContainer[DatasetVersion]
    next_page_token: str
    total_size: int
    def __init__(self, dataset_versions: _Optional[_Iterable[_Union[DatasetVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteDatasetVersionRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ValidateDatasetRequest(_message.Message):
    __slots__ = ("name", "model_version", "max_length", "expected_format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: str
    max_length: int
    expected_format: str
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[str] = ..., max_length: _Optional[int] = ..., expected_format: _Optional[str] = ...) -> None: ...

class ValidateDatasetResponse(_message.Message):
    __slots__ = ("format", "row_count", "valid_row_count", "token_stats", "errors")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    VALID_ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STATS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    format: str
    row_count: int
    valid_row_count: int
    token_stats: TokenStats
    errors: _containers.RepeatedCompositeFieldContainer[RowError]
    def __init__(self, format: _Optional[str] = ..., row_count: _Optional[int] = ..., valid_row_count: _Optional[int] = ..., token_stats: _Optional[_Union[TokenStats, _Mapping]] = ..., errors: _Optional[_Iterable[_Union[RowError, _Mapping]]] = ...) -> None: ...
