"""What the client returns: plain dataclasses and numpy arrays, never protobuf objects."""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

# An image for embed/adapt_head/classify: its encoded bytes (JPEG, PNG, ...) or the path of its file.
ImageLike: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str
    served_as: str = ""  # the server's name for it: what `backbone=` names
    precision: str = ""  # "fp32", "fp16" or "int8"; empty from servers that predate it
    # The backbone family (weights, tokenizer, pooling, normalisation), whatever the precision: what heads are
    # bound to. `fingerprint` names the embeddings and differs per precision (int8 has its own).
    weights_fingerprint: str = ""


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    preprocess_ms: float
    backbone_ms: float
    head_ms: float
    total_ms: float


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # (n, dim) float32 (or float16 when asked)
    truncated: tuple[bool, ...]
    backbone: BackboneInfo
    timings: Timings


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    train_count: int
    validation_count: int
    f1: float | None


@dataclass(frozen=True)
class HeadMetrics:
    """Estimates from held-out predictions: "cross_validation" (out-of-fold, the default), "validation" (one
    held-out split), or "train" when trained without validation (optimistic)."""

    evaluated_on: str
    accuracy: float
    macro_f1: float
    majority_baseline_accuracy: float
    negative_transfer: bool
    per_class: tuple[ClassMetrics, ...]
    epochs: int
    train_seconds: float
    train_examples: int  # examples the served head was fit on (all of them)
    validation_examples: int  # held-out predictions behind the metrics
    folds: int = 0  # cross-validation folds; 1 for a held-out split; 0 without validation
    log_loss: float | None = None  # of the calibrated held-out probabilities
    expected_calibration_error: float | None = None
    # 95% bootstrap intervals of the two: on a few dozen held-out predictions they are wide.
    log_loss_interval: tuple[float, float] | None = None
    expected_calibration_error_interval: tuple[float, float] | None = None
    # Prediction.ood_score above this: out_of_distribution. None: the head has no threshold (no validation,
    # or trained before thresholds were learned).
    ood_threshold: float | None = None
    ood_flagged_share: float | None = None  # of the held-out in-domain examples, by that threshold
    confidence_cap: float | None = None  # the top probability the held-out record supports (Laplace)


@dataclass(frozen=True)
class HeadVersion:
    version: int
    kind: str  # "linear" or "mlp"
    labels: tuple[str, ...]
    metrics: HeadMetrics
    created_at: dt.datetime  # UTC
    backbone_fingerprint: str
    example_count: int
    l2: float = 0.0  # the L2 strength it was fit with (scikit-learn's 1/C)
    l2_source: str = ""  # "cross_validation" or "validation" (chosen), "caller" or "default"
    temperature: float = 1.0  # calibration, already applied to its probabilities
    # The precision of the embeddings it was trained on ("fp32", "fp16", "int8"; "" for a version stored before
    # precisions were recorded: fp32 or fp16), the backbone weights it is bound to, and the precision the
    # server that answered this call serves it in ("" when that server does not serve it).
    trained_precision: str = ""
    weights_fingerprint: str = ""
    served_precision: str = ""


@dataclass(frozen=True)
class PromotionCheck:
    """One rule of the promotion gate, with its numbers."""

    rule: str  # "majority_baseline" or "active_version"
    passed: bool
    p_value: float  # one-sided; the rule fails below 0.01
    examples: int
    accuracy: float  # the new head's held-out accuracy on those examples
    reference_accuracy: float  # the baseline's, or the active version's
    reference_version: int  # the active version compared with; 0 for the baseline
    detail: str


@dataclass(frozen=True)
class AdaptProgress:
    stage: str  # "embedding" or "training"
    done: int
    total: int
    train_loss: float
    validation_loss: float | None
    validation_accuracy: float | None


@dataclass(frozen=True)
class AdaptResult:
    tenant: str
    head: HeadVersion | None  # None only for a call that stored examples and trained nothing (store_only)
    activated: bool
    active_version: int
    embedded: int  # inputs the backbone embedded for this call (the others came from the cache)
    cache_hits: int
    stored_examples: int = 0  # the tenant's stored examples after the call
    held_back_by: str = ""  # the gate rule that kept it from being activated; "" when activated
    checks: tuple[PromotionCheck, ...] = ()

    @property
    def version(self) -> int:
        """The new version (0 when nothing was trained)."""
        return self.head.version if self.head is not None else 0

    @property
    def metrics(self) -> HeadMetrics:
        if self.head is None:
            raise ValueError("this call stored examples and trained nothing: it has no metrics")
        return self.head.metrics


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    labels: tuple[LabelScore, ...]  # most probable first, top_k of them
    version: int  # the head version that answered
    truncated: bool
    # Top probability below the call's min_probability, or out_of_distribution (unless ignore_ood): ask a person.
    abstained: bool = False
    precision: str = ""  # of the backbone that answered ("fp32", "fp16", "int8"); "" from older servers
    trained_precision: str = ""  # of the embeddings the head was trained on; "" when not recorded
    # 1 - cosine similarity to the nearest stored training example (0: identical; up to 2); NaN when the head
    # stores no examples (trained before they were kept).
    ood_score: float = math.nan
    # ood_score above the head's ood_threshold: the input looks like nothing the head was trained on.
    out_of_distribution: bool = False

    @property
    def cross_precision(self) -> bool:
        """A head trained on embeddings of another precision of the same weights answered."""
        return bool(self.precision and self.trained_precision) and self.precision != self.trained_precision

    @property
    def label(self) -> str:
        return self.labels[0].label

    @property
    def probability(self) -> float:
        return self.labels[0].probability


@dataclass(frozen=True)
class HeadSummary:
    tenant: str
    active_version: int
    version_count: int
    labels: tuple[str, ...]
    backbone_fingerprint: str
    problem: str = ""  # set when the tenant's stored data is damaged (its calls answer DATA_LOSS)


@dataclass(frozen=True)
class HeadDetails:
    tenant: str
    active_version: int
    versions: tuple[HeadVersion, ...]  # oldest first
    example_count: int


@dataclass(frozen=True)
class Activation:
    tenant: str
    active_version: int
    previous_version: int


@dataclass(frozen=True)
class Deletion:
    tenant: str
    versions_deleted: int
    examples_deleted: int


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as the server lists it: never its secret."""

    id: str
    role: str  # "tenant" or "admin"
    tenant: str | None
    name: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class CreatedApiKey:
    key: str  # hsk_<id>_<secret>: shown once, keep it in a secret store
    info: ApiKeyInfo
