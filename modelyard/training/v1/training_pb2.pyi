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

class TrainingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_METHOD_UNSPECIFIED: _ClassVar[TrainingMethod]
    TRAINING_METHOD_FULL: _ClassVar[TrainingMethod]
    TRAINING_METHOD_LORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_QLORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_DORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_DPO: _ClassVar[TrainingMethod]
    TRAINING_METHOD_ORPO: _ClassVar[TrainingMethod]
    TRAINING_METHOD_KTO: _ClassVar[TrainingMethod]
    TRAINING_METHOD_SIMPO: _ClassVar[TrainingMethod]
    TRAINING_METHOD_CPO: _ClassVar[TrainingMethod]

class LrScheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULER_UNSPECIFIED: _ClassVar[LrScheduler]
    LR_SCHEDULER_COSINE: _ClassVar[LrScheduler]
    LR_SCHEDULER_LINEAR: _ClassVar[LrScheduler]
    LR_SCHEDULER_CONSTANT: _ClassVar[LrScheduler]
    LR_SCHEDULER_CONSTANT_WITH_WARMUP: _ClassVar[LrScheduler]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]

class LauncherType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAUNCHER_TYPE_UNSPECIFIED: _ClassVar[LauncherType]
    LAUNCHER_TYPE_LOCAL: _ClassVar[LauncherType]
    LAUNCHER_TYPE_TORCHRUN: _ClassVar[LauncherType]
    LAUNCHER_TYPE_DEEPSPEED: _ClassVar[LauncherType]

class ZeroStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ZERO_STAGE_UNSPECIFIED: _ClassVar[ZeroStage]
    ZERO_STAGE_1: _ClassVar[ZeroStage]
    ZERO_STAGE_2: _ClassVar[ZeroStage]
    ZERO_STAGE_3: _ClassVar[ZeroStage]

class TrainingJobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_KIND_UNSPECIFIED: _ClassVar[TrainingJobKind]
    TRAINING_JOB_KIND_TRAIN: _ClassVar[TrainingJobKind]
    TRAINING_JOB_KIND_MERGE: _ClassVar[TrainingJobKind]
TRAINING_METHOD_UNSPECIFIED: TrainingMethod
TRAINING_METHOD_FULL: TrainingMethod
TRAINING_METHOD_LORA: TrainingMethod
TRAINING_METHOD_QLORA: TrainingMethod
TRAINING_METHOD_DORA: TrainingMethod
TRAINING_METHOD_DPO: TrainingMethod
TRAINING_METHOD_ORPO: TrainingMethod
TRAINING_METHOD_KTO: TrainingMethod
TRAINING_METHOD_SIMPO: TrainingMethod
TRAINING_METHOD_CPO: TrainingMethod
LR_SCHEDULER_UNSPECIFIED: LrScheduler
LR_SCHEDULER_COSINE: LrScheduler
LR_SCHEDULER_LINEAR: LrScheduler
LR_SCHEDULER_CONSTANT: LrScheduler
LR_SCHEDULER_CONSTANT_WITH_WARMUP: LrScheduler
PRECISION_UNSPECIFIED: Precision
PRECISION_BF16: Precision
PRECISION_FP16: Precision
PRECISION_FP32: Precision
LAUNCHER_TYPE_UNSPECIFIED: LauncherType
LAUNCHER_TYPE_LOCAL: LauncherType
LAUNCHER_TYPE_TORCHRUN: LauncherType
LAUNCHER_TYPE_DEEPSPEED: LauncherType
ZERO_STAGE_UNSPECIFIED: ZeroStage
ZERO_STAGE_1: ZeroStage
ZERO_STAGE_2: ZeroStage
ZERO_STAGE_3: ZeroStage
TRAINING_JOB_KIND_UNSPECIFIED: TrainingJobKind
TRAINING_JOB_KIND_TRAIN: TrainingJobKind
TRAINING_JOB_KIND_MERGE: TrainingJobKind

class TrainingJob(_message.Message):
    __slots__ = ("name", "state", "error", "progress", "create_time", "start_time", "end_time", "attempt_count", "outputs", "display_name", "spec", "kind", "preflight")
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
    KIND_FIELD_NUMBER: _ClassVar[int]
    PREFLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _common_pb2.JobState
    error: _status_pb2.Status
    progress: _common_pb2.JobProgress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempt_count: int
    outputs: TrainingJobOutputs
    display_name: str
    spec: TrainingJobSpec
    kind: TrainingJobKind
    preflight: Preflight
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.JobProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., outputs: _Optional[_Union[TrainingJobOutputs, _Mapping]] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., kind: _Optional[_Union[TrainingJobKind, str]] = ..., preflight: _Optional[_Union[Preflight, _Mapping]] = ...) -> None: ...

class Preflight(_message.Message):
    __slots__ = ("accelerator", "precision", "estimated_memory_bytes", "available_memory_bytes", "parameter_count", "trainable_parameter_count")
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    accelerator: str
    precision: Precision
    estimated_memory_bytes: int
    available_memory_bytes: int
    parameter_count: int
    trainable_parameter_count: int
    def __init__(self, accelerator: _Optional[str] = ..., precision: _Optional[_Union[Precision, str]] = ..., estimated_memory_bytes: _Optional[int] = ..., available_memory_bytes: _Optional[int] = ..., parameter_count: _Optional[int] = ..., trainable_parameter_count: _Optional[int] = ...) -> None: ...

class TrainingJobSpec(_message.Message):
    __slots__ = ("base_model_version", "dataset_versions", "validation_dataset_version", "method", "hyperparameters", "launcher", "checkpoint_every_steps", "eval_every_steps", "output_model", "merge_adapter", "full_weights", "log_every_steps", "eval_after")
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MERGE_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FULL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LOG_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_AFTER_FIELD_NUMBER: _ClassVar[int]
    base_model_version: str
    dataset_versions: _containers.RepeatedScalarFieldContainer[str]
    validation_dataset_version: str
    method: TrainingMethod
    hyperparameters: Hyperparameters
    launcher: Launcher
    checkpoint_every_steps: int
    eval_every_steps: int
    output_model: str
    merge_adapter: bool
    full_weights: bool
    log_every_steps: int
    eval_after: EvalAfter
    def __init__(self, base_model_version: _Optional[str] = ..., dataset_versions: _Optional[_Iterable[str]] = ..., validation_dataset_version: _Optional[str] = ..., method: _Optional[_Union[TrainingMethod, str]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., launcher: _Optional[_Union[Launcher, _Mapping]] = ..., checkpoint_every_steps: _Optional[int] = ..., eval_every_steps: _Optional[int] = ..., output_model: _Optional[str] = ..., merge_adapter: _Optional[bool] = ..., full_weights: _Optional[bool] = ..., log_every_steps: _Optional[int] = ..., eval_after: _Optional[_Union[EvalAfter, _Mapping]] = ...) -> None: ...

class EvalAfter(_message.Message):
    __slots__ = ("benchmarks", "limit", "num_fewshot", "include_base")
    BENCHMARKS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NUM_FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BASE_FIELD_NUMBER: _ClassVar[int]
    benchmarks: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    num_fewshot: int
    include_base: bool
    def __init__(self, benchmarks: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., num_fewshot: _Optional[int] = ..., include_base: _Optional[bool] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "seed", "packing", "precision", "gradient_checkpointing", "beta", "simpo_gamma", "validation_split", "freeze_vision_tower", "freeze_aligner", "vision_learning_rate", "aligner_learning_rate", "max_images_per_sample")
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NUM_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SIMPO_GAMMA_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    FREEZE_VISION_TOWER_FIELD_NUMBER: _ClassVar[int]
    FREEZE_ALIGNER_FIELD_NUMBER: _ClassVar[int]
    VISION_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ALIGNER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    learning_rate: float
    lr_scheduler: LrScheduler
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    num_epochs: float
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    seed: int
    packing: bool
    precision: Precision
    gradient_checkpointing: bool
    beta: float
    simpo_gamma: float
    validation_split: float
    freeze_vision_tower: bool
    freeze_aligner: bool
    vision_learning_rate: float
    aligner_learning_rate: float
    max_images_per_sample: int
    def __init__(self, lora_rank: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., lora_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., learning_rate: _Optional[float] = ..., lr_scheduler: _Optional[_Union[LrScheduler, str]] = ..., warmup_ratio: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., num_epochs: _Optional[float] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., packing: _Optional[bool] = ..., precision: _Optional[_Union[Precision, str]] = ..., gradient_checkpointing: _Optional[bool] = ..., beta: _Optional[float] = ..., simpo_gamma: _Optional[float] = ..., validation_split: _Optional[float] = ..., freeze_vision_tower: _Optional[bool] = ..., freeze_aligner: _Optional[bool] = ..., vision_learning_rate: _Optional[float] = ..., aligner_learning_rate: _Optional[float] = ..., max_images_per_sample: _Optional[int] = ...) -> None: ...

class Launcher(_message.Message):
    __slots__ = ("type", "num_processes", "zero_stage", "offload_optimizer", "offload_parameters")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    type: LauncherType
    num_processes: int
    zero_stage: ZeroStage
    offload_optimizer: bool
    offload_parameters: bool
    def __init__(self, type: _Optional[_Union[LauncherType, str]] = ..., num_processes: _Optional[int] = ..., zero_stage: _Optional[_Union[ZeroStage, str]] = ..., offload_optimizer: _Optional[bool] = ..., offload_parameters: _Optional[bool] = ...) -> None: ...

class TrainingJobOutputs(_message.Message):
    __slots__ = ("model_version", "merged_model_version", "final_metrics", "checkpoint_count", "evaluation", "base_evaluation")
    class FinalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MERGED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    BASE_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    merged_model_version: str
    final_metrics: _containers.ScalarMap[str, float]
    checkpoint_count: int
    evaluation: str
    base_evaluation: str
    def __init__(self, model_version: _Optional[str] = ..., merged_model_version: _Optional[str] = ..., final_metrics: _Optional[_Mapping[str, float]] = ..., checkpoint_count: _Optional[int] = ..., evaluation: _Optional[str] = ..., base_evaluation: _Optional[str] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("name", "step", "create_time", "artifact_prefix", "size_bytes", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    create_time: _timestamp_pb2.Timestamp
    artifact_prefix: str
    size_bytes: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., artifact_prefix: _Optional[str] = ..., size_bytes: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CreateTrainingJobRequest(_message.Message):
    __slots__ = ("training_job", "training_job_id", "validate_only")
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    training_job_id: str
    validate_only: bool
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ..., training_job_id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
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

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("training_jobs", "next_page_token")
    TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    training_jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, training_jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
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

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "next_page_token")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    next_page_token: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MergeAdapterRequest(_message.Message):
    __slots__ = ("adapter_version", "output_model", "training_job_id", "display_name")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    output_model: str
    training_job_id: str
    display_name: str
    def __init__(self, adapter_version: _Optional[str] = ..., output_model: _Optional[str] = ..., training_job_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class MergeAdapterResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...
