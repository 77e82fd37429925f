"""Every conversion between protobuf messages and domain values, `*_from_pb` beside `*_to_pb`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from headswap.server import domain as d
from headswap.server.errors import InvalidArgument
from headswap.server.input_kinds import KINDS
from headswap.server.keys import ApiKey
from headswap.server.validation import check_request_id
from headswap.v1 import headswap_pb2 as pb

if TYPE_CHECKING:  # types only: the serving core never loads headswap.adapters
    from headswap.adapters.gate import GateCheck
    from headswap.adapters.results import HeadMetrics

# -- inputs and tensors ----------------------------------------------------------------------------------

_DTYPE_NAMES: dict[int, str] = {
    pb.ELEMENT_TYPE_UNSPECIFIED: "float32",
    pb.ELEMENT_TYPE_FLOAT32: "float32",
    pb.ELEMENT_TYPE_FLOAT16: "float16",
}


def inputs_from_pb(inputs: Iterable[pb.Input], what: str = "inputs") -> tuple[d.Input, ...]:
    """Each input's content is the field of its kind (`input_kinds.KINDS`) in the `content` oneof."""
    out = []
    for i, item in enumerate(inputs):
        kind = item.WhichOneof("content")
        if kind not in KINDS:
            raise InvalidArgument(f"{what}[{i}] has no content: set {' or '.join(f'`{k}`' for k in KINDS)}")
        out.append(d.Input(**{kind: getattr(item, kind)}))
    return tuple(out)


def dtype_from_pb(value: int) -> str:
    try:
        return _DTYPE_NAMES[value]
    except KeyError:
        raise InvalidArgument(
            f"unknown element type {value}: use ELEMENT_TYPE_FLOAT32 or ELEMENT_TYPE_FLOAT16"
        ) from None


def tensor_to_pb(array: np.ndarray) -> pb.Tensor:
    """Raw little-endian bytes; float16 arrays stay float16, everything else goes as float32."""
    dtype = np.dtype("<f2") if array.dtype == np.float16 else np.dtype("<f4")
    data = np.ascontiguousarray(array, dtype=dtype)
    code = pb.ELEMENT_TYPE_FLOAT16 if dtype == np.dtype("<f2") else pb.ELEMENT_TYPE_FLOAT32
    return pb.Tensor(dtype=code, shape=list(data.shape), data=data.tobytes())


def backbone_to_pb(desc: d.BackboneDescription) -> pb.BackboneInfo:
    return pb.BackboneInfo(
        name=desc.name,
        fingerprint=desc.fingerprint,
        embedding_dim=desc.embedding_dim,
        input_kind=desc.input_kind,
        max_length=desc.max_length,
        provider=desc.provider,
        served_as=desc.served_as,
        precision=desc.precision,
        weights_fingerprint=desc.weights_fingerprint,
    )


def timings_to_pb(t: d.Timings, total_s: float) -> pb.Timings:
    us = 1_000_000
    return pb.Timings(
        queue_us=int(t.queue_s * us),
        preprocess_us=int(t.preprocess_s * us),
        backbone_us=int(t.backbone_s * us),
        head_us=int(t.head_s * us),
        total_us=int(total_s * us),
    )


# -- Embed -----------------------------------------------------------------------------------------------


def embed_from_pb(request: pb.EmbedRequest, caller: d.Caller) -> d.EmbedRequest:
    return d.EmbedRequest(
        inputs_from_pb(request.inputs), dtype_from_pb(request.dtype), caller, request.backbone
    )


def embedded_to_pb(result: d.Embedded, total_s: float) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=tensor_to_pb(result.embeddings),
        truncated=result.truncated.tolist(),
        backbone=backbone_to_pb(result.backbone),
        timings=timings_to_pb(result.timings, total_s),
    )


# -- AdaptHead -------------------------------------------------------------------------------------------

_KINDS = {pb.HEAD_KIND_UNSPECIFIED: "linear", pb.HEAD_KIND_LINEAR: "linear", pb.HEAD_KIND_MLP: "mlp"}
_KIND_CODES = {"linear": pb.HEAD_KIND_LINEAR, "mlp": pb.HEAD_KIND_MLP}
_MODES = {pb.EXAMPLE_MODE_UNSPECIFIED: False, pb.EXAMPLE_MODE_ADD: False, pb.EXAMPLE_MODE_REPLACE: True}


def options_from_pb(options: pb.TrainingOptions) -> d.TrainingOptions:
    if options.kind not in _KINDS:
        raise InvalidArgument(f"unknown head kind {options.kind}: use HEAD_KIND_LINEAR or HEAD_KIND_MLP")
    return d.TrainingOptions(
        kind=_KINDS[options.kind],
        validation_fraction=options.validation_fraction,
        no_validation=options.no_validation,
        seed=options.seed,
        l2=options.l2,
        max_epochs=options.max_epochs,
        hidden_dim=options.hidden_dim,
        dropout=options.dropout,
    )


def adapt_from_pb(request: pb.AdaptHeadRequest, caller: d.Caller) -> d.AdaptRequest:
    if request.mode not in _MODES:
        raise InvalidArgument(
            f"unknown example mode {request.mode}: use EXAMPLE_MODE_ADD or EXAMPLE_MODE_REPLACE"
        )
    inputs = inputs_from_pb((e.input for e in request.examples), what="examples")
    return d.AdaptRequest(
        tenant=request.tenant,
        examples=tuple(d.Example(x, e.label) for x, e in zip(inputs, request.examples, strict=True)),
        replace=_MODES[request.mode],
        force_activate=request.force_activate,
        options=options_from_pb(request.options),
        caller=caller,
        backbone=request.backbone,
        store_only=request.store_only,
        request_id=check_request_id(request.request_id),
    )


def metrics_to_pb(m: HeadMetrics, labels: Sequence[str]) -> pb.HeadMetrics:
    return pb.HeadMetrics(
        evaluated_on=m.evaluated_on,
        accuracy=m.accuracy,
        macro_f1=m.macro_f1,
        majority_baseline_accuracy=m.majority_baseline_accuracy,
        negative_transfer=m.negative_transfer,
        per_class=[
            pb.ClassMetrics(
                label=labels[c.label_index],
                train_count=c.train_count,
                validation_count=c.validation_count,
                f1=c.f1,
            )
            for c in m.per_class
        ],
        epochs=m.epochs,
        train_seconds=m.train_seconds,
        train_examples=m.train_examples,
        validation_examples=m.validation_examples,
        folds=m.folds,
        log_loss=m.log_loss,
        expected_calibration_error=m.expected_calibration_error,
        log_loss_low=m.log_loss_interval[0] if m.log_loss_interval else None,
        log_loss_high=m.log_loss_interval[1] if m.log_loss_interval else None,
        expected_calibration_error_low=(
            m.expected_calibration_error_interval[0] if m.expected_calibration_error_interval else None
        ),
        expected_calibration_error_high=(
            m.expected_calibration_error_interval[1] if m.expected_calibration_error_interval else None
        ),
        ood_threshold=m.ood_threshold,
        ood_flagged_share=m.ood_flagged_share,
        confidence_cap=m.confidence_cap,
    )


def version_to_pb(v: d.VersionInfo) -> pb.HeadVersion:
    return pb.HeadVersion(
        version=v.version,
        kind=_KIND_CODES[v.kind],
        labels=list(v.labels),
        metrics=metrics_to_pb(v.metrics, v.labels),
        created_at_unix=v.created_at,
        created_at=_timestamp(v.created_at),
        backbone_fingerprint=v.fingerprint,
        example_count=v.example_count,
        l2=v.l2,
        l2_source=v.l2_source,
        temperature=v.temperature,
        trained_precision=v.trained_precision,
        weights_fingerprint=v.weights_fingerprint,
        served_precision=v.served_precision,
    )


def check_to_pb(c: GateCheck) -> pb.PromotionCheck:
    return pb.PromotionCheck(
        rule=c.rule,
        passed=c.passed,
        p_value=c.p_value,
        examples=c.examples,
        accuracy=c.accuracy,
        reference_accuracy=c.reference_accuracy,
        reference_version=c.reference_version,
        detail=c.detail,
    )


def adapt_event_to_pb(event: d.Progress | d.AdaptOutcome) -> pb.AdaptHeadResponse:
    if isinstance(event, d.Progress):
        return pb.AdaptHeadResponse(
            progress=pb.AdaptHeadProgress(
                stage=event.stage,
                done=event.done,
                total=event.total,
                train_loss=event.train_loss,
                validation_loss=event.validation_loss,
                validation_accuracy=event.validation_accuracy,
            )
        )
    return pb.AdaptHeadResponse(
        result=pb.AdaptHeadResult(
            tenant=event.tenant,
            head=version_to_pb(event.head) if event.head is not None else None,
            activated=event.activated,
            active_version=event.active_version,
            embedded=event.embedded,
            cache_hits=event.cache_hits,
            stored_examples=event.stored_examples,
            held_back_by=event.held_back_by,
            checks=[check_to_pb(c) for c in event.checks],
        )
    )


# -- Classify --------------------------------------------------------------------------------------------


def classify_from_pb(request: pb.ClassifyRequest, caller: d.Caller) -> d.ClassifyRequest:
    return d.ClassifyRequest(
        request.tenant,
        inputs_from_pb(request.inputs),
        request.top_k,
        request.version,
        caller,
        min_probability=request.min_probability,
        ignore_ood=request.ignore_ood,
    )


def classified_to_pb(result: d.Classified, total_s: float) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        predictions=[
            pb.Prediction(
                labels=[pb.LabelScore(label=name, probability=p) for name, p in row],
                truncated=bool(cut),
                abstained=abstained,
                ood_score=ood,
                out_of_distribution=flagged,
            )
            for row, cut, abstained, ood, flagged in zip(
                result.labels,
                result.truncated,
                result.abstained,
                result.ood_scores,
                result.out_of_distribution,
                strict=True,
            )
        ],
        version=result.version,
        backbone=backbone_to_pb(result.backbone),
        timings=timings_to_pb(result.timings, total_s),
        trained_precision=result.trained_precision,
    )


# -- management ------------------------------------------------------------------------------------------


def list_from_pb(request: pb.ListHeadsRequest, caller: d.Caller) -> d.ListRequest:
    return d.ListRequest(caller)


def summaries_to_pb(rows: Sequence[d.HeadSummary]) -> pb.ListHeadsResponse:
    return pb.ListHeadsResponse(
        heads=[
            pb.HeadSummary(
                tenant=h.tenant,
                active_version=h.active_version,
                version_count=h.version_count,
                labels=list(h.labels),
                backbone_fingerprint=h.fingerprint,
                problem=h.problem,
            )
            for h in rows
        ]
    )


def tenant_from_pb(request: pb.GetHeadRequest | pb.DeleteHeadRequest, caller: d.Caller) -> d.TenantRequest:
    return d.TenantRequest(request.tenant, caller)


def overview_to_pb(o: d.HeadOverview) -> pb.GetHeadResponse:
    return pb.GetHeadResponse(
        tenant=o.tenant,
        active_version=o.active_version,
        versions=[version_to_pb(v) for v in o.versions],
        example_count=o.example_count,
    )


def activate_from_pb(request: pb.ActivateHeadVersionRequest, caller: d.Caller) -> d.ActivateRequest:
    return d.ActivateRequest(request.tenant, request.version, caller)


def activation_to_pb(a: d.Activation) -> pb.ActivateHeadVersionResponse:
    return pb.ActivateHeadVersionResponse(
        tenant=a.tenant, active_version=a.active_version, previous_version=a.previous_version
    )


def deletion_to_pb(x: d.Deletion) -> pb.DeleteHeadResponse:
    return pb.DeleteHeadResponse(
        tenant=x.tenant, versions_deleted=x.versions_deleted, examples_deleted=x.examples_deleted
    )


def version_from_pb(request: pb.DeleteHeadVersionRequest, caller: d.Caller) -> d.VersionRequest:
    return d.VersionRequest(request.tenant, request.version, caller)


def version_deleted_to_pb(o: d.HeadOverview) -> pb.DeleteHeadVersionResponse:
    return pb.DeleteHeadVersionResponse(head=overview_to_pb(o))


# -- API keys --------------------------------------------------------------------------------------------

_ROLES = {pb.API_KEY_ROLE_TENANT: "tenant", pb.API_KEY_ROLE_ADMIN: "admin"}
_ROLE_CODES = {v: k for k, v in _ROLES.items()}


def create_key_from_pb(request: pb.CreateApiKeyRequest, caller: d.Caller) -> d.CreateKeyRequest:
    if request.role not in _ROLES:
        raise InvalidArgument(f"role must be API_KEY_ROLE_TENANT or API_KEY_ROLE_ADMIN, not {request.role}")
    # Seconds read as they came: a Duration past timedelta's range (found by the fuzz test) is a bad ttl for
    # the service to refuse, not an OverflowError here.
    ttl = request.ttl.seconds + request.ttl.nanos / 1e9 if request.HasField("ttl") else None
    return d.CreateKeyRequest(_ROLES[request.role], request.tenant or None, request.name, ttl, caller)


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    # Clamped to the years a Timestamp can say (1 to 9999): a key stored with any expiry still lists.
    ts.FromNanoseconds(int(min(max(seconds, -62135596800.0), 253402300799.0) * 1e9))
    return ts


def key_info_to_pb(key: ApiKey) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(
        id=key.id,
        role=_ROLE_CODES[key.role],
        tenant=key.tenant or "",
        name=key.name,
        created_at=_timestamp(key.created_at),
        expires_at=_timestamp(key.expires_at),
        revoked_at=_timestamp(key.revoked_at),
    )


def created_key_to_pb(key: str, record: ApiKey) -> pb.CreateApiKeyResponse:
    return pb.CreateApiKeyResponse(key=key, info=key_info_to_pb(record))


def keys_to_pb(keys: Sequence[ApiKey]) -> pb.ListApiKeysResponse:
    return pb.ListApiKeysResponse(keys=[key_info_to_pb(k) for k in keys])


def revoked_to_pb(key: ApiKey) -> pb.RevokeApiKeyResponse:
    return pb.RevokeApiKeyResponse(info=key_info_to_pb(key))
