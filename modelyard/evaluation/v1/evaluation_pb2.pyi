import datetime

from google.protobuf import duration_pb2 as _duration_pb2
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

class BenchmarkKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BENCHMARK_KIND_UNSPECIFIED: _ClassVar[BenchmarkKind]
    BENCHMARK_KIND_MULTIPLE_CHOICE: _ClassVar[BenchmarkKind]
    BENCHMARK_KIND_GENERATION: _ClassVar[BenchmarkKind]
    BENCHMARK_KIND_PERPLEXITY: _ClassVar[BenchmarkKind]
    BENCHMARK_KIND_CODE: _ClassVar[BenchmarkKind]
BENCHMARK_KIND_UNSPECIFIED: BenchmarkKind
BENCHMARK_KIND_MULTIPLE_CHOICE: BenchmarkKind
BENCHMARK_KIND_GENERATION: BenchmarkKind
BENCHMARK_KIND_PERPLEXITY: BenchmarkKind
BENCHMARK_KIND_CODE: BenchmarkKind

class Evaluation(_message.Message):
    __slots__ = ("name", "state", "error", "progress", "create_time", "start_time", "end_time", "attempt_count", "outputs", "display_name", "spec", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
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
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _common_pb2.JobState
    error: _status_pb2.Status
    progress: _common_pb2.JobProgress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempt_count: int
    outputs: EvaluationOutputs
    display_name: str
    spec: EvaluationSpec
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., outputs: _Optional[_Union[EvaluationOutputs, _Mapping]] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[EvaluationSpec, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EvaluationSpec(_message.Message):
    __slots__ = ("benchmarks", "model_version", "deployment", "endpoint", "limit", "num_fewshot", "generation", "batch_size", "adapter", "apply_chat_template", "engine")
    BENCHMARKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    benchmarks: _containers.RepeatedCompositeFieldContainer[BenchmarkRun]
    model_version: str
    deployment: str
    endpoint: OpenAIEndpoint
    limit: int
    num_fewshot: int
    generation: GenerationConfig
    batch_size: int
    adapter: str
    apply_chat_template: bool
    engine: str
    def __init__(self, benchmarks: _Optional[_Iterable[_Union[BenchmarkRun, _Mapping]]] = ..., model_version: _Optional[str] = ..., deployment: _Optional[str] = ..., endpoint: _Optional[_Union[OpenAIEndpoint, _Mapping]] = ..., limit: _Optional[int] = ..., num_fewshot: _Optional[int] = ..., generation: _Optional[_Union[GenerationConfig, _Mapping]] = ..., batch_size: _Optional[int] = ..., adapter: _Optional[str] = ..., apply_chat_template: _Optional[bool] = ..., engine: _Optional[str] = ...) -> None: ...

class BenchmarkRun(_message.Message):
    __slots__ = ("benchmark", "options", "num_fewshot", "limit", "dataset_version")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    options: _containers.ScalarMap[str, str]
    num_fewshot: int
    limit: int
    dataset_version: str
    def __init__(self, benchmark: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., num_fewshot: _Optional[int] = ..., limit: _Optional[int] = ..., dataset_version: _Optional[str] = ...) -> None: ...

class OpenAIEndpoint(_message.Message):
    __slots__ = ("base_url", "model", "api_key")
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    base_url: str
    model: str
    api_key: str
    def __init__(self, base_url: _Optional[str] = ..., model: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class GenerationConfig(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class EvaluationOutputs(_message.Message):
    __slots__ = ("results", "report_artifact_key", "deployment", "temporary_deployment", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_ARTIFACT_KEY_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TEMPORARY_DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BenchmarkResult]
    report_artifact_key: str
    deployment: str
    temporary_deployment: bool
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[BenchmarkResult, _Mapping]]] = ..., report_artifact_key: _Optional[str] = ..., deployment: _Optional[str] = ..., temporary_deployment: _Optional[bool] = ..., model_version: _Optional[str] = ...) -> None: ...

class BenchmarkResult(_message.Message):
    __slots__ = ("benchmark", "metrics", "num_samples", "predictions_artifact_key", "duration", "error", "stderr", "num_fewshot", "samples_per_second")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StderrEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_ARTIFACT_KEY_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    metrics: _containers.ScalarMap[str, float]
    num_samples: int
    predictions_artifact_key: str
    duration: _duration_pb2.Duration
    error: _status_pb2.Status
    stderr: _containers.ScalarMap[str, float]
    num_fewshot: int
    samples_per_second: float
    def __init__(self, benchmark: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_samples: _Optional[int] = ..., predictions_artifact_key: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., stderr: _Optional[_Mapping[str, float]] = ..., num_fewshot: _Optional[int] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class Benchmark(_message.Message):
    __slots__ = ("name", "display_name", "description", "kind", "metrics", "options", "num_samples", "default_num_fewshot", "source")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    kind: BenchmarkKind
    metrics: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.ScalarMap[str, str]
    num_samples: int
    default_num_fewshot: int
    source: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., kind: _Optional[_Union[BenchmarkKind, str]] = ..., metrics: _Optional[_Iterable[str]] = ..., options: _Optional[_Mapping[str, str]] = ..., num_samples: _Optional[int] = ..., default_num_fewshot: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class CreateEvaluationRequest(_message.Message):
    __slots__ = ("evaluation", "evaluation_id", "validate_only")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    evaluation: Evaluation
    evaluation_id: str
    validate_only: bool
    def __init__(self, evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., evaluation_id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GetEvaluationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListEvaluationsRequest(_message.Message):
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

class ListEvaluationsResponse(_message.Message):
    __slots__ = ("evaluations", "next_page_token")
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    next_page_token: str
    def __init__(self, evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelEvaluationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchEvaluationRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class CompareEvaluationsRequest(_message.Message):
    __slots__ = ("names", "benchmarks", "max_changed_samples")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    BENCHMARKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANGED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    benchmarks: _containers.RepeatedScalarFieldContainer[str]
    max_changed_samples: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., benchmarks: _Optional[_Iterable[str]] = ..., max_changed_samples: _Optional[int] = ...) -> None: ...

class CompareEvaluationsResponse(_message.Message):
    __slots__ = ("evaluations", "rows", "changed_samples")
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    evaluations: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[MetricComparison]
    changed_samples: _containers.RepeatedCompositeFieldContainer[ChangedSample]
    def __init__(self, evaluations: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[MetricComparison, _Mapping]]] = ..., changed_samples: _Optional[_Iterable[_Union[ChangedSample, _Mapping]]] = ...) -> None: ...

class ChangedSample(_message.Message):
    __slots__ = ("benchmark", "doc_id", "evaluation", "baseline_score", "score", "baseline_prediction", "prediction", "reference")
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    doc_id: str
    evaluation: str
    baseline_score: float
    score: float
    baseline_prediction: str
    prediction: str
    reference: str
    def __init__(self, benchmark: _Optional[str] = ..., doc_id: _Optional[str] = ..., evaluation: _Optional[str] = ..., baseline_score: _Optional[float] = ..., score: _Optional[float] = ..., baseline_prediction: _Optional[str] = ..., prediction: _Optional[str] = ..., reference: _Optional[str] = ...) -> None: ...

class MetricDelta(_message.Message):
    __slots__ = ("evaluation", "delta", "ci_low", "ci_high", "paired_samples")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    PAIRED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    evaluation: str
    delta: float
    ci_low: float
    ci_high: float
    paired_samples: int
    def __init__(self, evaluation: _Optional[str] = ..., delta: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., paired_samples: _Optional[int] = ...) -> None: ...

class MetricComparison(_message.Message):
    __slots__ = ("benchmark", "metric", "values", "deltas")
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    metric: str
    values: _containers.RepeatedCompositeFieldContainer[MetricValue]
    deltas: _containers.RepeatedCompositeFieldContainer[MetricDelta]
    def __init__(self, benchmark: _Optional[str] = ..., metric: _Optional[str] = ..., values: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ..., deltas: _Optional[_Iterable[_Union[MetricDelta, _Mapping]]] = ...) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("value", "stderr")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    value: float
    stderr: float
    def __init__(self, value: _Optional[float] = ..., stderr: _Optional[float] = ...) -> None: ...

class ListBenchmarksRequest(_message.Message):
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

class ListBenchmarksResponse(_message.Message):
    __slots__ = ("benchmarks", "next_page_token")
    BENCHMARKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    benchmarks: _containers.RepeatedCompositeFieldContainer[Benchmark]
    next_page_token: str
    def __init__(self, benchmarks: _Optional[_Iterable[_Union[Benchmark, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
