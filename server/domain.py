"""Plain values passed between the edge and the services: no protobuf, no gRPC past `rpc/`.

An `Input` is text or image bytes; an `Example` is an input and a label; each service call takes a frozen
request and returns a frozen result. `Caller` says who is calling, as established by the edge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from headswap.adapters import GateCheck, HeadMetrics

InputKind = Literal["text", "image"]


@dataclass(frozen=True, slots=True)
class Input:
    """One item for a backbone: exactly one of `text` or `image` (encoded bytes)."""

    text: str | None = None
    image: bytes | None = None

    @property
    def kind(self) -> InputKind:
        return "text" if self.text is not None else "image"

    def content_key(self) -> bytes:
        """sha256 of the content: the embedding cache's key (with the backbone's fingerprint)."""
        data = self.text.encode("utf-8") if self.text is not None else (self.image or b"")
        return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class Example:
    input: Input
    label: str


@dataclass(frozen=True)
class Caller:
    """Who is calling. Without authentication every caller is `ANONYMOUS`, which may do everything."""

    name: str = "anonymous"
    tenant: str | None = None  # the one tenant a tenant caller may act for; None for admin/anonymous
    admin: bool = True


ANONYMOUS = Caller()


@dataclass(frozen=True)
class BackboneDescription:
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str


@dataclass(frozen=True)
class Timings:
    queue_s: float = 0.0
    preprocess_s: float = 0.0
    backbone_s: float = 0.0
    head_s: float = 0.0


# -- Embed -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedRequest:
    inputs: tuple[Input, ...]
    dtype: str = "float32"  # or "float16": the element type of the reply
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class Embedded:
    embeddings: np.ndarray  # (n, dim), in the requested dtype
    truncated: np.ndarray  # bool (n,)
    timings: Timings
    backbone: BackboneDescription


# -- heads -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingOptions:
    """A caller's training options as sent; zero values mean the server's defaults (cross-validated
    model selection and calibration, then a refit on every example)."""

    kind: str = "linear"
    validation_fraction: float = 0.0  # > 0: one held-out split of this share instead of cross-validation
    no_validation: bool = False
    seed: int = 0
    l2: float = 0.0
    max_epochs: int = 0
    hidden_dim: int = 0
    dropout: float = 0.0


@dataclass(frozen=True)
class AdaptRequest:
    tenant: str
    examples: tuple[Example, ...]
    replace: bool = False
    force_activate: bool = False
    options: TrainingOptions = field(default_factory=TrainingOptions)
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class Progress:
    stage: str  # "embedding" or "training"
    done: int
    total: int
    train_loss: float = 0.0
    validation_loss: float | None = None
    validation_accuracy: float | None = None


@dataclass(frozen=True)
class VersionInfo:
    version: int
    kind: str
    labels: tuple[str, ...]
    metrics: HeadMetrics
    created_at: float
    fingerprint: str
    example_count: int
    l2: float  # the served head's L2 strength
    l2_source: str  # "cross_validation", "validation", "caller" or "default"
    temperature: float  # calibration, already folded into the served weights


@dataclass(frozen=True)
class AdaptOutcome:
    tenant: str
    head: VersionInfo
    activated: bool
    active_version: int
    embedded: int
    cache_hits: int
    held_back_by: str = ""  # the gate rule that kept the version from being activated; "" when activated
    checks: tuple[GateCheck, ...] = ()  # every gate rule that ran


@dataclass(frozen=True)
class ClassifyRequest:
    tenant: str
    inputs: tuple[Input, ...]
    top_k: int = 1
    version: int = 0  # 0: the active version
    caller: Caller = ANONYMOUS
    min_probability: float = 0.0  # below this top probability a prediction is marked abstained; 0: never


@dataclass(frozen=True)
class Classified:
    labels: list[list[tuple[str, float]]]  # per input, most probable first
    truncated: np.ndarray
    version: int
    timings: Timings
    backbone: BackboneDescription
    abstained: list[bool] = field(default_factory=list)  # per input


@dataclass(frozen=True)
class TenantRequest:
    """GetHead and DeleteHead: one tenant."""

    tenant: str
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class ListRequest:
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class HeadSummary:
    tenant: str
    active_version: int
    version_count: int
    labels: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class HeadOverview:
    tenant: str
    active_version: int
    versions: tuple[VersionInfo, ...]
    example_count: int


@dataclass(frozen=True)
class ActivateRequest:
    tenant: str
    version: int
    caller: Caller = ANONYMOUS


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
