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
    QUANTIZATION_METHOD_FP8_WEIGHT_ONLY: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_BNB_4BIT: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_BNB_8BIT: _ClassVar[QuantizationMethod]
QUANTIZATION_METHOD_UNSPECIFIED: QuantizationMethod
QUANTIZATION_METHOD_AWQ: QuantizationMethod
QUANTIZATION_METHOD_GPTQ: QuantizationMethod
QUANTIZATION_METHOD_INT8_WEIGHT_ONLY: QuantizationMethod
QUANTIZATION_METHOD_FP8_WEIGHT_ONLY: QuantizationMethod
QUANTIZATION_METHOD_BNB_4BIT: QuantizationMethod
QUANTIZATION_METHOD_BNB_8BIT: QuantizationMethod

class QuantizationJob(_message.Message):
    __slots__ = ("name", "state", "error", "progress", "create_time", "start_time", "end_time", "attempt_count", "outputs", "display_name", "spec")
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
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., outputs: _Optional[_Union[QuantizationJobOutputs, _Mapping]] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[QuantizationJobSpec, _Mapping]] = ...) -> None: ...

class QuantizationJobSpec(_message.Message):
    __slots__ = ("source_model_version", "method", "bits", "group_size", "calibration_dataset_version", "calibration_samples", "calibration_max_length", "output_model")
    SOURCE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    source_model_version: str
    method: QuantizationMethod
    bits: int
    group_size: int
    calibration_dataset_version: str
    calibration_samples: int
    calibration_max_length: int
    output_model: str
    def __init__(self, source_model_version: _Optional[str] = ..., method: _Optional[_Union[QuantizationMethod, str]] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., calibration_dataset_version: _Optional[str] = ..., calibration_samples: _Optional[int] = ..., calibration_max_length: _Optional[int] = ..., output_model: _Optional[str] = ...) -> None: ...

class QuantizationJobOutputs(_message.Message):
    __slots__ = ("model_version", "size_bytes")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    size_bytes: int
    def __init__(self, model_version: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class CreateQuantizationJobRequest(_message.Message):
    __slots__ = ("quantization_job", "quantization_job_id")
    QUANTIZATION_JOB_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    quantization_job: QuantizationJob
    quantization_job_id: str
    def __init__(self, quantization_job: _Optional[_Union[QuantizationJob, _Mapping]] = ..., quantization_job_id: _Optional[str] = ...) -> None: ...

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
