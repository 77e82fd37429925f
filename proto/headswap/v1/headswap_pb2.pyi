import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ElementType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ELEMENT_TYPE_UNSPECIFIED: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT32: _ClassVar[ElementType]
    ELEMENT_TYPE_FLOAT16: _ClassVar[ElementType]

class HeadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEAD_KIND_UNSPECIFIED: _ClassVar[HeadKind]
    HEAD_KIND_LINEAR: _ClassVar[HeadKind]
    HEAD_KIND_MLP: _ClassVar[HeadKind]

class ExampleMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXAMPLE_MODE_UNSPECIFIED: _ClassVar[ExampleMode]
    EXAMPLE_MODE_ADD: _ClassVar[ExampleMode]
    EXAMPLE_MODE_REPLACE: _ClassVar[ExampleMode]

class ApiKeyRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY_ROLE_UNSPECIFIED: _ClassVar[ApiKeyRole]
    API_KEY_ROLE_TENANT: _ClassVar[ApiKeyRole]
    API_KEY_ROLE_ADMIN: _ClassVar[ApiKeyRole]
ELEMENT_TYPE_UNSPECIFIED: ElementType
ELEMENT_TYPE_FLOAT32: ElementType
ELEMENT_TYPE_FLOAT16: ElementType
HEAD_KIND_UNSPECIFIED: HeadKind
HEAD_KIND_LINEAR: HeadKind
HEAD_KIND_MLP: HeadKind
EXAMPLE_MODE_UNSPECIFIED: ExampleMode
EXAMPLE_MODE_ADD: ExampleMode
EXAMPLE_MODE_REPLACE: ExampleMode
API_KEY_ROLE_UNSPECIFIED: ApiKeyRole
API_KEY_ROLE_TENANT: ApiKeyRole
API_KEY_ROLE_ADMIN: ApiKeyRole

class Input(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: ElementType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[ElementType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BackboneInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "embedding_dim", "input_kind", "max_length", "provider", "served_as", "precision", "weights_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SERVED_AS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str
    served_as: str
    precision: str
    weights_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., input_kind: _Optional[str] = ..., max_length: _Optional[int] = ..., provider: _Optional[str] = ..., served_as: _Optional[str] = ..., precision: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_us", "preprocess_us", "backbone_us", "head_us", "total_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_US_FIELD_NUMBER: _ClassVar[int]
    HEAD_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    preprocess_us: int
    backbone_us: int
    head_us: int
    total_us: int
    def __init__(self, queue_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., backbone_us: _Optional[int] = ..., head_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "dtype", "backbone")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    dtype: ElementType
    backbone: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., dtype: _Optional[_Union[ElementType, str]] = ..., backbone: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "truncated", "backbone", "timings")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    backbone: BackboneInfo
    timings: Timings
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., truncated: _Optional[_Iterable[bool]] = ..., backbone: _Optional[_Union[BackboneInfo, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class LabelledExample(_message.Message):
    __slots__ = ("input", "label")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    input: Input
    label: str
    def __init__(self, input: _Optional[_Union[Input, _Mapping]] = ..., label: _Optional[str] = ...) -> None: ...

class TrainingOptions(_message.Message):
    __slots__ = ("kind", "validation_fraction", "no_validation", "seed", "l2", "max_epochs", "hidden_dim", "dropout")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NO_VALIDATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    kind: HeadKind
    validation_fraction: float
    no_validation: bool
    seed: int
    l2: float
    max_epochs: int
    hidden_dim: int
    dropout: float
    def __init__(self, kind: _Optional[_Union[HeadKind, str]] = ..., validation_fraction: _Optional[float] = ..., no_validation: _Optional[bool] = ..., seed: _Optional[int] = ..., l2: _Optional[float] = ..., max_epochs: _Optional[int] = ..., hidden_dim: _Optional[int] = ..., dropout: _Optional[float] = ...) -> None: ...

class AdaptHeadRequest(_message.Message):
    __slots__ = ("tenant", "examples", "options", "mode", "force_activate", "backbone", "store_only", "request_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FORCE_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    STORE_ONLY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    examples: _containers.RepeatedCompositeFieldContainer[LabelledExample]
    options: TrainingOptions
    mode: ExampleMode
    force_activate: bool
    backbone: str
    store_only: bool
    request_id: str
    def __init__(self, tenant: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[LabelledExample, _Mapping]]] = ..., options: _Optional[_Union[TrainingOptions, _Mapping]] = ..., mode: _Optional[_Union[ExampleMode, str]] = ..., force_activate: _Optional[bool] = ..., backbone: _Optional[str] = ..., store_only: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class AdaptHeadProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "train_loss", "validation_loss", "validation_accuracy")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., validation_accuracy: _Optional[float] = ...) -> None: ...

class ClassMetrics(_message.Message):
    __slots__ = ("label", "train_count", "validation_count", "f1")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_COUNT_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    label: str
    train_count: int
    validation_count: int
    f1: float
    def __init__(self, label: _Optional[str] = ..., train_count: _Optional[int] = ..., validation_count: _Optional[int] = ..., f1: _Optional[float] = ...) -> None: ...

class HeadMetrics(_message.Message):
    __slots__ = ("evaluated_on", "accuracy", "macro_f1", "majority_baseline_accuracy", "negative_transfer", "per_class", "epochs", "train_seconds", "train_examples", "validation_examples", "folds", "log_loss", "expected_calibration_error", "log_loss_low", "log_loss_high", "expected_calibration_error_low", "expected_calibration_error_high", "ood_threshold", "ood_flagged_share", "confidence_cap")
    EVALUATED_ON_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CALIBRATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_LOW_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_HIGH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CALIBRATION_ERROR_LOW_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CALIBRATION_ERROR_HIGH_FIELD_NUMBER: _ClassVar[int]
    OOD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OOD_FLAGGED_SHARE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_CAP_FIELD_NUMBER: _ClassVar[int]
    evaluated_on: str
    accuracy: float
    macro_f1: float
    majority_baseline_accuracy: float
    negative_transfer: bool
    per_class: _containers.RepeatedCompositeFieldContainer[ClassMetrics]
    epochs: int
    train_seconds: float
    train_examples: int
    validation_examples: int
    folds: int
    log_loss: float
    expected_calibration_error: float
    log_loss_low: float
    log_loss_high: float
    expected_calibration_error_low: float
    expected_calibration_error_high: float
    ood_threshold: float
    ood_flagged_share: float
    confidence_cap: float
    def __init__(self, evaluated_on: _Optional[str] = ..., accuracy: _Optional[float] = ..., macro_f1: _Optional[float] = ..., majority_baseline_accuracy: _Optional[float] = ..., negative_transfer: _Optional[bool] = ..., per_class: _Optional[_Iterable[_Union[ClassMetrics, _Mapping]]] = ..., epochs: _Optional[int] = ..., train_seconds: _Optional[float] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., folds: _Optional[int] = ..., log_loss: _Optional[float] = ..., expected_calibration_error: _Optional[float] = ..., log_loss_low: _Optional[float] = ..., log_loss_high: _Optional[float] = ..., expected_calibration_error_low: _Optional[float] = ..., expected_calibration_error_high: _Optional[float] = ..., ood_threshold: _Optional[float] = ..., ood_flagged_share: _Optional[float] = ..., confidence_cap: _Optional[float] = ...) -> None: ...

class HeadVersion(_message.Message):
    __slots__ = ("version", "kind", "labels", "metrics", "created_at_unix", "backbone_fingerprint", "example_count", "created_at", "l2", "l2_source", "temperature", "trained_precision", "weights_fingerprint", "served_precision")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    L2_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TRAINED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: HeadKind
    labels: _containers.RepeatedScalarFieldContainer[str]
    metrics: HeadMetrics
    created_at_unix: float
    backbone_fingerprint: str
    example_count: int
    created_at: _timestamp_pb2.Timestamp
    l2: float
    l2_source: str
    temperature: float
    trained_precision: str
    weights_fingerprint: str
    served_precision: str
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[HeadKind, str]] = ..., labels: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Union[HeadMetrics, _Mapping]] = ..., created_at_unix: _Optional[float] = ..., backbone_fingerprint: _Optional[str] = ..., example_count: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., l2: _Optional[float] = ..., l2_source: _Optional[str] = ..., temperature: _Optional[float] = ..., trained_precision: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., served_precision: _Optional[str] = ...) -> None: ...

class PromotionCheck(_message.Message):
    __slots__ = ("rule", "passed", "p_value", "examples", "accuracy", "reference_accuracy", "reference_version", "detail")
    RULE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    rule: str
    passed: bool
    p_value: float
    examples: int
    accuracy: float
    reference_accuracy: float
    reference_version: int
    detail: str
    def __init__(self, rule: _Optional[str] = ..., passed: _Optional[bool] = ..., p_value: _Optional[float] = ..., examples: _Optional[int] = ..., accuracy: _Optional[float] = ..., reference_accuracy: _Optional[float] = ..., reference_version: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class AdaptHeadResult(_message.Message):
    __slots__ = ("tenant", "head", "activated", "active_version", "embedded", "cache_hits", "stored_examples", "held_back_by", "checks")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    STORED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    HELD_BACK_BY_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    head: HeadVersion
    activated: bool
    active_version: int
    embedded: int
    cache_hits: int
    stored_examples: int
    held_back_by: str
    checks: _containers.RepeatedCompositeFieldContainer[PromotionCheck]
    def __init__(self, tenant: _Optional[str] = ..., head: _Optional[_Union[HeadVersion, _Mapping]] = ..., activated: _Optional[bool] = ..., active_version: _Optional[int] = ..., embedded: _Optional[int] = ..., cache_hits: _Optional[int] = ..., stored_examples: _Optional[int] = ..., held_back_by: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[PromotionCheck, _Mapping]]] = ...) -> None: ...

class AdaptHeadResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: AdaptHeadProgress
    result: AdaptHeadResult
    def __init__(self, progress: _Optional[_Union[AdaptHeadProgress, _Mapping]] = ..., result: _Optional[_Union[AdaptHeadResult, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("tenant", "inputs", "top_k", "version", "min_probability", "ignore_ood")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_OOD_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    top_k: int
    version: int
    min_probability: float
    ignore_ood: bool
    def __init__(self, tenant: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., top_k: _Optional[int] = ..., version: _Optional[int] = ..., min_probability: _Optional[float] = ..., ignore_ood: _Optional[bool] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("labels", "truncated", "abstained", "ood_score", "out_of_distribution")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    truncated: bool
    abstained: bool
    ood_score: float
    out_of_distribution: bool
    def __init__(self, labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., truncated: _Optional[bool] = ..., abstained: _Optional[bool] = ..., ood_score: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "version", "backbone", "timings", "trained_precision")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    version: int
    backbone: BackboneInfo
    timings: Timings
    trained_precision: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., version: _Optional[int] = ..., backbone: _Optional[_Union[BackboneInfo, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., trained_precision: _Optional[str] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeadSummary(_message.Message):
    __slots__ = ("tenant", "active_version", "version_count", "labels", "backbone_fingerprint", "problem")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    active_version: int
    version_count: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    backbone_fingerprint: str
    problem: str
    def __init__(self, tenant: _Optional[str] = ..., active_version: _Optional[int] = ..., version_count: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., backbone_fingerprint: _Optional[str] = ..., problem: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadSummary]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadSummary, _Mapping]]] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetHeadResponse(_message.Message):
    __slots__ = ("tenant", "active_version", "versions", "example_count")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    active_version: int
    versions: _containers.RepeatedCompositeFieldContainer[HeadVersion]
    example_count: int
    def __init__(self, tenant: _Optional[str] = ..., active_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[HeadVersion, _Mapping]]] = ..., example_count: _Optional[int] = ...) -> None: ...

class ActivateHeadVersionRequest(_message.Message):
    __slots__ = ("tenant", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ActivateHeadVersionResponse(_message.Message):
    __slots__ = ("tenant", "active_version", "previous_version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    active_version: int
    previous_version: int
    def __init__(self, tenant: _Optional[str] = ..., active_version: _Optional[int] = ..., previous_version: _Optional[int] = ...) -> None: ...

class DeleteHeadRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class DeleteHeadResponse(_message.Message):
    __slots__ = ("tenant", "versions_deleted", "examples_deleted")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_DELETED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    versions_deleted: int
    examples_deleted: int
    def __init__(self, tenant: _Optional[str] = ..., versions_deleted: _Optional[int] = ..., examples_deleted: _Optional[int] = ...) -> None: ...

class DeleteHeadVersionRequest(_message.Message):
    __slots__ = ("tenant", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteHeadVersionResponse(_message.Message):
    __slots__ = ("head",)
    HEAD_FIELD_NUMBER: _ClassVar[int]
    head: GetHeadResponse
    def __init__(self, head: _Optional[_Union[GetHeadResponse, _Mapping]] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("id", "role", "tenant", "name", "created_at", "expires_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: ApiKeyRole
    tenant: str
    name: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., role: _Optional[_Union[ApiKeyRole, str]] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("role", "tenant", "name", "ttl")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    role: ApiKeyRole
    tenant: str
    name: str
    ttl: _duration_pb2.Duration
    def __init__(self, role: _Optional[_Union[ApiKeyRole, str]] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "info")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    key: str
    info: ApiKeyInfo
    def __init__(self, key: _Optional[str] = ..., info: _Optional[_Union[ApiKeyInfo, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ApiKeyInfo
    def __init__(self, info: _Optional[_Union[ApiKeyInfo, _Mapping]] = ...) -> None: ...
