"""Every conversion between protobuf messages and domain values, `*_from_pb` beside `*_to_pb`.

Fields of the same name on both sides are copied by `headswap.client._wire` (`to_message`, `from_message`),
and head kinds are the names of the `HeadKind` enum's values, so neither is written out here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from headswap.client._wire import HEAD_KIND_CODES, HEAD_KINDS, from_message, to_message
from headswap.server import domain as d
from headswap.server.errors import InvalidArgument
from headswap.server.input_kinds import KINDS
from headswap.server.keys import ApiKey
from headswap.server.validation import check_request_id
from headswap.v1 import headswap_pb2 as pb

if TYPE_CHECKING:  # types only: the serving core never loads headswap.adapters
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
    return to_message(pb.BackboneInfo, desc)


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

_KINDS = {pb.HEAD_KIND_UNSPECIFIED: "linear", **HEAD_KINDS}
_MODES = {pb.EXAMPLE_MODE_UNSPECIFIED: False, pb.EXAMPLE_MODE_ADD: False, pb.EXAMPLE_MODE_REPLACE: True}


def options_from_pb(options: pb.TrainingOptions) -> d.TrainingOptions:
    if options.kind not in _KINDS:
        names = " or ".join(pb.HeadKind.Name(code) for code in HEAD_KINDS)
        raise InvalidArgument(f"unknown head kind {options.kind}: use {names}")
    return from_message(d.TrainingOptions, options, kind=_KINDS[options.kind])


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
    low_high = m.log_loss_interval or (None, None)
    ece_low_high = m.expected_calibration_error_interval or (None, None)
    return to_message(
        pb.HeadMetrics,
        m,
        per_class=[to_message(pb.ClassMetrics, c, label=labels[c.label_index]) for c in m.per_class],
        log_loss_low=low_high[0],
        log_loss_high=low_high[1],
        expected_calibration_error_low=ece_low_high[0],
        expected_calibration_error_high=ece_low_high[1],
    )


def version_to_pb(v: d.VersionInfo) -> pb.HeadVersion:
    return to_message(
        pb.HeadVersion,
        v,
        kind=HEAD_KIND_CODES[v.kind],
        metrics=metrics_to_pb(v.metrics, v.labels),
        created_at_unix=v.created_at,
        created_at=timestamp(v.created_at),
        backbone_fingerprint=v.fingerprint,
    )


def adapt_event_to_pb(event: d.Progress | d.AdaptOutcome) -> pb.AdaptHeadResponse:
    if isinstance(event, d.Progress):
        return pb.AdaptHeadResponse(progress=to_message(pb.AdaptHeadProgress, event))
    return pb.AdaptHeadResponse(
        result=to_message(
            pb.AdaptHeadResult,
            event,
            head=version_to_pb(event.head) if event.head is not None else None,
            checks=[to_message(pb.PromotionCheck, c) for c in event.checks],
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
        heads=[to_message(pb.HeadSummary, h, backbone_fingerprint=h.fingerprint) for h in rows]
    )


def tenant_from_pb(request: pb.GetHeadRequest | pb.DeleteHeadRequest, caller: d.Caller) -> d.TenantRequest:
    return d.TenantRequest(request.tenant, caller)


def overview_to_pb(o: d.HeadOverview) -> pb.GetHeadResponse:
    return to_message(pb.GetHeadResponse, o, versions=[version_to_pb(v) for v in o.versions])


def activate_from_pb(request: pb.ActivateHeadVersionRequest, caller: d.Caller) -> d.VersionRequest:
    return d.VersionRequest(request.tenant, request.version, caller)


def activation_to_pb(a: d.Activation) -> pb.ActivateHeadVersionResponse:
    return to_message(pb.ActivateHeadVersionResponse, a)


def deletion_to_pb(x: d.Deletion) -> pb.DeleteHeadResponse:
    return to_message(pb.DeleteHeadResponse, x)


def version_from_pb(request: pb.DeleteHeadVersionRequest, caller: d.Caller) -> d.VersionRequest:
    return d.VersionRequest(request.tenant, request.version, caller)


def version_deleted_to_pb(o: d.HeadOverview) -> pb.DeleteHeadVersionResponse:
    return pb.DeleteHeadVersionResponse(head=overview_to_pb(o))


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    # Clamped to the years a Timestamp can say (1 to 9999): a key stored with any expiry still lists.
    ts.FromNanoseconds(int(min(max(seconds, -62135596800.0), 253402300799.0) * 1e9))
    return ts


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


def key_info_to_pb(key: ApiKey) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(
        id=key.id,
        role=_ROLE_CODES[key.role],
        tenant=key.tenant or "",
        name=key.name,
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        revoked_at=timestamp(key.revoked_at),
    )


def created_key_to_pb(key: str, record: ApiKey) -> pb.CreateApiKeyResponse:
    return pb.CreateApiKeyResponse(key=key, info=key_info_to_pb(record))


def keys_to_pb(keys: Sequence[ApiKey]) -> pb.ListApiKeysResponse:
    return pb.ListApiKeysResponse(keys=[key_info_to_pb(k) for k in keys])


def revoked_to_pb(key: ApiKey) -> pb.RevokeApiKeyResponse:
    return pb.RevokeApiKeyResponse(info=key_info_to_pb(key))
