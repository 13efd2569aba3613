import datetime

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

class QuantizationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_METHOD_UNSPECIFIED: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_AWQ: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_GPTQ: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_INT8_WEIGHT_ONLY: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_FP8_DYNAMIC: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_BNB_4BIT: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_BNB_8BIT: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_W8A8_INT8: _ClassVar[QuantizationMethod]

class QuantizationBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_BACKEND_UNSPECIFIED: _ClassVar[QuantizationBackend]
    QUANTIZATION_BACKEND_LLM_COMPRESSOR: _ClassVar[QuantizationBackend]
    QUANTIZATION_BACKEND_AUTOAWQ: _ClassVar[QuantizationBackend]
    QUANTIZATION_BACKEND_GPTQMODEL: _ClassVar[QuantizationBackend]
    QUANTIZATION_BACKEND_BITSANDBYTES: _ClassVar[QuantizationBackend]
QUANTIZATION_METHOD_UNSPECIFIED: QuantizationMethod
QUANTIZATION_METHOD_AWQ: QuantizationMethod
QUANTIZATION_METHOD_GPTQ: QuantizationMethod
QUANTIZATION_METHOD_INT8_WEIGHT_ONLY: QuantizationMethod
QUANTIZATION_METHOD_FP8_DYNAMIC: QuantizationMethod
QUANTIZATION_METHOD_BNB_4BIT: QuantizationMethod
QUANTIZATION_METHOD_BNB_8BIT: QuantizationMethod
QUANTIZATION_METHOD_W8A8_INT8: QuantizationMethod
QUANTIZATION_BACKEND_UNSPECIFIED: QuantizationBackend
QUANTIZATION_BACKEND_LLM_COMPRESSOR: QuantizationBackend
QUANTIZATION_BACKEND_AUTOAWQ: QuantizationBackend
QUANTIZATION_BACKEND_GPTQMODEL: QuantizationBackend
QUANTIZATION_BACKEND_BITSANDBYTES: QuantizationBackend

class QuantizationJob(_message.Message):
    __slots__ = ("name", "state", "error", "progress", "create_time", "start_time", "end_time", "attempt_count", "outputs", "display_name", "spec", "preflight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PREFLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _common_pb2.JobState
    error: _status_pb2.Status
    progress: _common_pb2.JobProgress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempt_count: int
    outputs: QuantizationJobOutputs
    display_name: str
    spec: QuantizationJobSpec
    preflight: QuantizationPreflight
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., outputs: _Optional[_Union[QuantizationJobOutputs, _Mapping]] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[QuantizationJobSpec, _Mapping]] = ..., preflight: _Optional[_Union[QuantizationPreflight, _Mapping]] = ...) -> None: ...

class QuantizationJobSpec(_message.Message):
    __slots__ = ("source_model_version", "method", "bits", "group_size", "calibration_dataset_version", "calibration_samples", "calibration_max_length", "output_model", "backend", "merge_adapter")
    SOURCE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MERGE_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    source_model_version: str
    method: QuantizationMethod
    bits: int
    group_size: int
    calibration_dataset_version: str
    calibration_samples: int
    calibration_max_length: int
    output_model: str
    backend: QuantizationBackend
    merge_adapter: bool
    def __init__(self, source_model_version: _Optional[str] = ..., method: _Optional[_Union[QuantizationMethod, str]] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., calibration_dataset_version: _Optional[str] = ..., calibration_samples: _Optional[int] = ..., calibration_max_length: _Optional[int] = ..., output_model: _Optional[str] = ..., backend: _Optional[_Union[QuantizationBackend, str]] = ..., merge_adapter: _Optional[bool] = ...) -> None: ...

class QuantizationPreflight(_message.Message):
    __slots__ = ("accelerator", "estimated_memory_bytes", "available_memory_bytes", "parameter_count", "source_size_bytes", "expected_size_bytes", "unquantized_layers", "format", "verify_engine")
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNQUANTIZED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_ENGINE_FIELD_NUMBER: _ClassVar[int]
    accelerator: str
    estimated_memory_bytes: int
    available_memory_bytes: int
    parameter_count: int
    source_size_bytes: int
    expected_size_bytes: int
    unquantized_layers: _containers.RepeatedScalarFieldContainer[str]
    format: str
    verify_engine: str
    def __init__(self, accelerator: _Optional[str] = ..., estimated_memory_bytes: _Optional[int] = ..., available_memory_bytes: _Optional[int] = ..., parameter_count: _Optional[int] = ..., source_size_bytes: _Optional[int] = ..., expected_size_bytes: _Optional[int] = ..., unquantized_layers: _Optional[_Iterable[str]] = ..., format: _Optional[str] = ..., verify_engine: _Optional[str] = ...) -> None: ...

class QuantizationQuality(_message.Message):
    __slots__ = ("source_perplexity", "quantized_perplexity", "top1_agreement", "eval_tokens")
    SOURCE_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    EVAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    source_perplexity: float
    quantized_perplexity: float
    top1_agreement: float
    eval_tokens: int
    def __init__(self, source_perplexity: _Optional[float] = ..., quantized_perplexity: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., eval_tokens: _Optional[int] = ...) -> None: ...

class QuantizationJobOutputs(_message.Message):
    __slots__ = ("model_version", "size_bytes", "source_size_bytes", "quality", "merged_model_version", "unquantized_layers", "library_versions", "format", "verified_with")
    class LibraryVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MERGED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNQUANTIZED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_WITH_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    size_bytes: int
    source_size_bytes: int
    quality: QuantizationQuality
    merged_model_version: str
    unquantized_layers: _containers.RepeatedScalarFieldContainer[str]
    library_versions: _containers.ScalarMap[str, str]
    format: str
    verified_with: str
    def __init__(self, model_version: _Optional[str] = ..., size_bytes: _Optional[int] = ..., source_size_bytes: _Optional[int] = ..., quality: _Optional[_Union[QuantizationQuality, _Mapping]] = ..., merged_model_version: _Optional[str] = ..., unquantized_layers: _Optional[_Iterable[str]] = ..., library_versions: _Optional[_Mapping[str, str]] = ..., format: _Optional[str] = ..., verified_with: _Optional[str] = ...) -> None: ...

class CreateQuantizationJobRequest(_message.Message):
    __slots__ = ("quantization_job", "quantization_job_id", "validate_only")
    QUANTIZATION_JOB_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    quantization_job: QuantizationJob
    quantization_job_id: str
    validate_only: bool
    def __init__(self, quantization_job: _Optional[_Union[QuantizationJob, _Mapping]] = ..., quantization_job_id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GetQuantizationJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListQuantizationJobsRequest(_message.Message):
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

class ListQuantizationJobsResponse(_message.Message):
    __slots__ = ("quantization_jobs", "next_page_token")
    QUANTIZATION_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    quantization_jobs: _containers.RepeatedCompositeFieldContainer[QuantizationJob]
    next_page_token: str
    def __init__(self, quantization_jobs: _Optional[_Iterable[_Union[QuantizationJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelQuantizationJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchQuantizationJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...
