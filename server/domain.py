"""Plain values passed between the edge and the services: no protobuf, no gRPC past `rpc/`.

An `Input` is one item of a registered input kind (a text, an image's bytes); an `Example` is an input and a
label; each service call takes a frozen request and returns a frozen result. `Caller` says who is calling, as established by the edge.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from headswap.client.results import Activation as Activation  # results the client returns as they are
from headswap.client.results import Deletion as Deletion
from headswap.server.input_kinds import KINDS, input_kind

if TYPE_CHECKING:  # types only: the serving core never loads headswap.adapters
    from headswap.adapters.gate import GateCheck
    from headswap.adapters.results import HeadMetrics


@dataclass(frozen=True, slots=True, init=False)
class Input:
    """One item for a backbone: its kind (registered in `input_kinds.py`: "text", "image") and its content,
    a str for a text and the encoded bytes for the others. Built with one keyword, the kind's name:
    `Input(text="...")`, `Input(image=b"...")`."""

    kind: str
    content: str | bytes

    def __init__(self, **content: str | bytes) -> None:
        if len(content) != 1:
            raise TypeError(f"an Input takes one keyword, its kind ({', '.join(KINDS)}), not {len(content)}")
        ((kind, value),) = content.items()
        if kind not in KINDS:
            input_kind(kind)  # ValueError naming the registered kinds
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "content", value)

    @property
    def nbytes(self) -> int:
        """Size as sent (UTF-8 bytes of a text)."""
        return KINDS[self.kind].size(self.content)

    def content_key(self) -> bytes:
        """sha256 of the content: the embedding cache's key (with the backbone's fingerprint)."""
        return KINDS[self.kind].content_key(self.content)


@dataclass(frozen=True, slots=True)
class Example:
    input: Input
    label: str


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the call's credentials. Without authentication every caller is `ANONYMOUS`,
    which may do everything; a tenant key's caller acts for its one tenant; an admin key's for any."""

    name: str = "anonymous"  # the key's id, for logs (never the secret)
    tenant: str | None = None  # the one tenant a tenant key may act for; None for admin/anonymous
    admin: bool = True

    def tenant_for(self, requested: str) -> str:
        """The tenant a request acts for: a tenant key's own (the request may leave it empty, or must
        repeat it); any valid name for an admin. PERMISSION_DENIED whether or not another tenant exists."""
        from headswap.server.errors import PermissionDenied
        from headswap.server.validation import check_tenant

        if self.tenant is None:
            return check_tenant(requested)
        if requested not in ("", self.tenant):
            raise PermissionDenied(
                "this API key acts only for its own tenant: leave `tenant` empty or name yours"
            )
        return self.tenant

    def require_admin(self, what: str) -> None:
        from headswap.server.errors import PermissionDenied

        if not self.admin:
            raise PermissionDenied(f"{what} needs an admin API key")


ANONYMOUS = Caller()

# The deadline (time.monotonic()) of the call being served, set by the edge from the transport's deadline:
# work that cannot finish before it is refused at once rather than started.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "headswap_deadline", default=None
)


def seconds_left() -> float | None:
    deadline = call_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@dataclass(frozen=True)
class BackboneDescription:
    served_as: str  # the name this server serves it under (--backbone NAME=DIR; by default its input kind)
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str
    precision: str = "fp32"
    weights_fingerprint: str = ""  # the backbone family, what heads are bound to (fingerprint: per precision)


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
    backbone: str = ""  # a served backbone's name; "": the one that takes the inputs' kind


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
    backbone: str = ""  # a served backbone's name; "": the one that takes the examples' kind
    store_only: bool = False  # store (and embed) the examples, train nothing: a large set in several calls
    request_id: str = ""  # the caller's idempotency key: a retry is answered with the first outcome


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
    trained_precision: str = ""  # of the embeddings it was trained on; "" not recorded (fp32 or fp16)
    weights_fingerprint: str = ""  # the backbone family it is bound to
    served_precision: str = ""  # the precision this server answers it in; "" when this server does not


@dataclass(frozen=True)
class AdaptOutcome:
    tenant: str
    head: VersionInfo | None  # None after a store_only call: nothing was trained
    activated: bool
    active_version: int
    embedded: int
    cache_hits: int
    stored_examples: int = 0
    held_back_by: str = ""  # the gate rule that kept the version from being activated; "" when activated
    checks: tuple[GateCheck, ...] = ()  # every gate rule that ran
    replayed: bool = False  # a retry's answer: the first call's outcome (same request_id), nothing done again


@dataclass(frozen=True)
class ClassifyRequest:
    tenant: str
    inputs: tuple[Input, ...]
    top_k: int = 1
    version: int = 0  # 0: the active version
    caller: Caller = ANONYMOUS
    min_probability: float = 0.0  # below this top probability a prediction is marked abstained; 0: never
    # False (default): an out_of_distribution input is abstained too; True: only min_probability abstains.
    ignore_ood: bool = False


@dataclass(frozen=True)
class Classified:
    labels: list[list[tuple[str, float]]]  # per input, most probable first
    truncated: np.ndarray
    version: int
    timings: Timings
    backbone: BackboneDescription  # its precision is the one that answered
    abstained: list[bool] = field(default_factory=list)  # per input
    trained_precision: str = ""  # of the embeddings the head was trained on; "" not recorded (fp32 or fp16)
    # per input: 1 - cosine similarity to the nearest stored training example (NaN: the head stores none)
    ood_scores: list[float] = field(default_factory=list)
    out_of_distribution: list[bool] = field(default_factory=list)  # per input: ood_score above the threshold


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
    problem: str = ""  # set when the tenant is quarantined: what is damaged


@dataclass(frozen=True)
class HeadOverview:
    tenant: str
    active_version: int
    versions: tuple[VersionInfo, ...]
    example_count: int


@dataclass(frozen=True)
class VersionRequest:
    """ActivateHeadVersion and DeleteHeadVersion: one version of one tenant."""

    tenant: str
    version: int
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class CreateKeyRequest:
    role: str  # "tenant" or "admin"
    tenant: str | None
    name: str = ""
    ttl_s: float | None = None  # None: no expiry
    caller: Caller = ANONYMOUS
