"""What the client returns: plain dataclasses and numpy arrays, never protobuf objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str
    precision: str = ""  # "fp32", "fp16" or "int8"; empty from servers that predate it


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
    evaluated_on: str  # "validation", or "train" when trained without a validation split
    accuracy: float
    macro_f1: float
    majority_baseline_accuracy: float
    negative_transfer: bool
    per_class: tuple[ClassMetrics, ...]
    epochs: int
    train_seconds: float
    train_examples: int
    validation_examples: int


@dataclass(frozen=True)
class HeadVersion:
    version: int
    kind: str  # "linear" or "mlp"
    labels: tuple[str, ...]
    metrics: HeadMetrics
    created_at: float  # Unix time
    backbone_fingerprint: str
    example_count: int


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
    head: HeadVersion
    activated: bool
    active_version: int
    embedded: int
    cache_hits: int

    @property
    def version(self) -> int:
        return self.head.version

    @property
    def metrics(self) -> HeadMetrics:
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
