"""Requests from Python values, results from replies: the only client module that touches `*_pb2` messages."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headswap.client import results as r
from headswap.v1 import headswap_pb2 as pb

_ELEMENT_TYPES = {"float32": pb.ELEMENT_TYPE_FLOAT32, "float16": pb.ELEMENT_TYPE_FLOAT16}
_NUMPY: dict[int, np.dtype] = {
    pb.ELEMENT_TYPE_FLOAT32: np.dtype("<f4"),
    pb.ELEMENT_TYPE_FLOAT16: np.dtype("<f2"),
}


def element_type(name: str) -> pb.ElementType:
    try:
        return _ELEMENT_TYPES[str(np.dtype(name))]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be float32 or float16, not {name!r}") from None


def tensor(t: pb.Tensor) -> np.ndarray:
    dtype = _NUMPY.get(t.dtype)
    if dtype is None:
        raise ValueError(f"unknown element type {t.dtype} in reply")
    shape = tuple(int(d) for d in t.shape)
    array = np.frombuffer(t.data, dtype=dtype)
    # Native byte order for callers; a no-op copy-free view on little-endian machines.
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def backbone(b: pb.BackboneInfo) -> r.BackboneInfo:
    return r.BackboneInfo(
        b.name,
        b.fingerprint,
        b.embedding_dim,
        b.input_kind,
        b.max_length,
        b.provider,
        b.served_as,
        b.precision,
        b.weights_fingerprint,
    )


def image_bytes(item: r.ImageLike) -> bytes:
    """An image's encoded bytes: given as bytes, or read from a path."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str | os.PathLike):
        return Path(item).read_bytes()
    raise TypeError(f"an image is its encoded bytes or a path to its file, not {type(item).__name__}")


def inputs(texts: Sequence[str] | None, images: Sequence[r.ImageLike] | None, call: str) -> list[pb.Input]:
    """The inputs of a call: texts, or images (bytes or paths), never both."""
    if (texts is None) == (images is None):
        raise TypeError(f"{call}() takes texts or images=..., one of the two")
    if texts is not None:
        if isinstance(texts, str):
            raise TypeError(f"{call}() takes a sequence of texts, not a single string: wrap it in a list")
        return [pb.Input(text=t) for t in texts]
    assert images is not None
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike):
        raise TypeError(f"{call}() takes a sequence of images, not a single one: wrap it in a list")
    return [pb.Input(image=image_bytes(item)) for item in images]


def timings(t: pb.Timings) -> r.Timings:
    ms = 1000.0
    return r.Timings(
        t.queue_us / ms, t.preprocess_us / ms, t.backbone_us / ms, t.head_us / ms, t.total_us / ms
    )


def embed_request(
    texts: Sequence[str] | None, images: Sequence[r.ImageLike] | None, dtype: str, backbone: str
) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        inputs=inputs(texts, images, "embed"), dtype=element_type(dtype), backbone=backbone
    )


def embed_result(reply: pb.EmbedResponse) -> r.EmbedResult:
    return r.EmbedResult(
        embeddings=tensor(reply.embeddings),
        truncated=tuple(reply.truncated),
        backbone=backbone(reply.backbone),
        timings=timings(reply.timings),
    )


# -- heads -----------------------------------------------------------------------------------------------

_KINDS = {pb.HEAD_KIND_LINEAR: "linear", pb.HEAD_KIND_MLP: "mlp"}
_KIND_CODES = {"linear": pb.HEAD_KIND_LINEAR, "mlp": pb.HEAD_KIND_MLP}
_OPTION_NAMES = {"kind", "validation_fraction", "seed", "l2", "max_epochs", "hidden_dim", "dropout"}
_REQUEST_OPTIONS = {"replace", "force_activate", "backbone", "request_id"}
CHUNK_BYTES = 4 * 1024 * 1024  # examples per AdaptHead call: half a server's default limit of 8 MiB


def split_adapt(request: pb.AdaptHeadRequest, chunk_bytes: int = CHUNK_BYTES) -> list[pb.AdaptHeadRequest]:
    """One request, or several of at most `chunk_bytes` of examples each (an example larger than that goes
    alone): all but the last store their examples only (the first replacing, if asked), the last trains on
    everything stored."""
    chunks: list[list[pb.LabelledExample]] = [[]]
    size = 0
    for example in request.examples:
        n = example.ByteSize()
        if chunks[-1] and size + n > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(example)
        size += n
    if len(chunks) == 1:
        return [request]
    parts = []
    for i, examples in enumerate(chunks):
        part = pb.AdaptHeadRequest()
        part.CopyFrom(request)
        del part.examples[:]
        part.examples.extend(examples)
        if i > 0:
            part.mode = pb.EXAMPLE_MODE_ADD
        part.store_only = i < len(chunks) - 1
        if request.request_id:  # each call of the upload is its own call, retried on its own
            part.request_id = f"{request.request_id}/{i + 1}"
        parts.append(part)
    return parts


def adapt_request(
    tenant: str,
    texts: Sequence[str] | None,
    images: Sequence[r.ImageLike] | None,
    labels: Sequence[str] | None,
    options: Mapping[str, Any],
) -> pb.AdaptHeadRequest:
    """`options`: the training options, `replace`, `force_activate`, `backbone` and `request_id` (the
    idempotency key; default: a new random one; "": none)."""
    replace, force_activate = bool(options.get("replace")), bool(options.get("force_activate"))
    backbone = str(options.get("backbone", ""))
    request_id = options.get("request_id")
    request_id = uuid.uuid4().hex if request_id is None else str(request_id)
    options = {k: v for k, v in options.items() if k not in _REQUEST_OPTIONS}
    if labels is None or isinstance(labels, str):
        raise TypeError("labels must be a sequence of strings, one per example")
    examples = inputs(texts, images, "adapt_head")
    if len(examples) != len(labels):
        what = "texts" if texts is not None else "images"
        raise ValueError(f"{len(examples)} {what} but {len(labels)} labels: give one label per example")
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    opts = pb.TrainingOptions()
    if "kind" in options:
        if options["kind"] not in _KIND_CODES:
            raise ValueError(f"kind must be 'linear' or 'mlp', not {options['kind']!r}")
        opts.kind = _KIND_CODES[options["kind"]]
    if "validation_fraction" in options:
        fraction = float(options["validation_fraction"])
        if fraction == 0.0:
            opts.no_validation = True
        else:
            opts.validation_fraction = fraction
    for name in ("seed", "max_epochs", "hidden_dim"):
        if name in options:
            setattr(opts, name, int(options[name]))
    for name in ("l2", "dropout"):
        if name in options:
            setattr(opts, name, float(options[name]))
    return pb.AdaptHeadRequest(
        tenant=tenant,
        examples=[pb.LabelledExample(input=x, label=y) for x, y in zip(examples, labels, strict=True)],
        options=opts,
        mode=pb.EXAMPLE_MODE_REPLACE if replace else pb.EXAMPLE_MODE_ADD,
        force_activate=force_activate,
        backbone=backbone,
        request_id=request_id,
    )


def head_metrics(m: pb.HeadMetrics) -> r.HeadMetrics:
    return r.HeadMetrics(
        evaluated_on=m.evaluated_on,
        accuracy=m.accuracy,
        macro_f1=m.macro_f1,
        majority_baseline_accuracy=m.majority_baseline_accuracy,
        negative_transfer=m.negative_transfer,
        per_class=tuple(
            r.ClassMetrics(c.label, c.train_count, c.validation_count, c.f1 if c.HasField("f1") else None)
            for c in m.per_class
        ),
        epochs=m.epochs,
        train_seconds=m.train_seconds,
        train_examples=m.train_examples,
        validation_examples=m.validation_examples,
        folds=m.folds,
        log_loss=m.log_loss if m.HasField("log_loss") else None,
        expected_calibration_error=(
            m.expected_calibration_error if m.HasField("expected_calibration_error") else None
        ),
        log_loss_interval=(m.log_loss_low, m.log_loss_high) if m.HasField("log_loss_low") else None,
        expected_calibration_error_interval=(
            (m.expected_calibration_error_low, m.expected_calibration_error_high)
            if m.HasField("expected_calibration_error_low")
            else None
        ),
        ood_threshold=m.ood_threshold if m.HasField("ood_threshold") else None,
        ood_flagged_share=m.ood_flagged_share if m.HasField("ood_flagged_share") else None,
        confidence_cap=m.confidence_cap if m.HasField("confidence_cap") else None,
    )


def head_version(v: pb.HeadVersion) -> r.HeadVersion:
    return r.HeadVersion(
        version=v.version,
        kind=_KINDS.get(v.kind, "unknown"),
        labels=tuple(v.labels),
        metrics=head_metrics(v.metrics),
        created_at=_created(v),
        backbone_fingerprint=v.backbone_fingerprint,
        example_count=v.example_count,
        l2=v.l2,
        l2_source=v.l2_source,
        temperature=v.temperature,
        trained_precision=v.trained_precision,
        weights_fingerprint=v.weights_fingerprint,
        served_precision=v.served_precision,
    )


def _created(v: pb.HeadVersion) -> dt.datetime:
    """When a version was made, in UTC; from the deprecated seconds field when an older server sent it."""
    if v.HasField("created_at"):
        return v.created_at.ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]
    return dt.datetime.fromtimestamp(v.created_at_unix, dt.UTC)


def adapt_progress(p: pb.AdaptHeadProgress) -> r.AdaptProgress:
    return r.AdaptProgress(
        stage=p.stage,
        done=p.done,
        total=p.total,
        train_loss=p.train_loss,
        validation_loss=p.validation_loss if p.HasField("validation_loss") else None,
        validation_accuracy=p.validation_accuracy if p.HasField("validation_accuracy") else None,
    )


def promotion_check(c: pb.PromotionCheck) -> r.PromotionCheck:
    return r.PromotionCheck(
        c.rule,
        c.passed,
        c.p_value,
        c.examples,
        c.accuracy,
        c.reference_accuracy,
        c.reference_version,
        c.detail,
    )


def adapt_result(a: pb.AdaptHeadResult) -> r.AdaptResult:
    return r.AdaptResult(
        a.tenant,
        head_version(a.head) if a.HasField("head") else None,
        a.activated,
        a.active_version,
        a.embedded,
        a.cache_hits,
        a.stored_examples,
        a.held_back_by,
        tuple(promotion_check(c) for c in a.checks),
    )


def classify_request(
    tenant: str,
    texts: Sequence[str] | None,
    images: Sequence[r.ImageLike] | None,
    top_k: int,
    version: int,
    min_probability: float = 0.0,
    ignore_ood: bool = False,
) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        tenant=tenant,
        inputs=inputs(texts, images, "classify"),
        top_k=top_k,
        version=version,
        min_probability=min_probability,
        ignore_ood=ignore_ood,
    )


def predictions(reply: pb.ClassifyResponse) -> list[r.Prediction]:
    return [
        r.Prediction(
            tuple(r.LabelScore(s.label, s.probability) for s in p.labels),
            reply.version,
            p.truncated,
            p.abstained,
            reply.backbone.precision,
            reply.trained_precision,
            p.ood_score,
            p.out_of_distribution,
        )
        for p in reply.predictions
    ]


def head_summaries(reply: pb.ListHeadsResponse) -> list[r.HeadSummary]:
    return [
        r.HeadSummary(
            h.tenant, h.active_version, h.version_count, tuple(h.labels), h.backbone_fingerprint, h.problem
        )
        for h in reply.heads
    ]


def delete_version_request(tenant: str, version: int) -> pb.DeleteHeadVersionRequest:
    return pb.DeleteHeadVersionRequest(tenant=tenant, version=version)


def version_deleted(reply: pb.DeleteHeadVersionResponse) -> r.HeadDetails:
    return head_details(reply.head)


def head_details(reply: pb.GetHeadResponse) -> r.HeadDetails:
    return r.HeadDetails(
        reply.tenant,
        reply.active_version,
        tuple(head_version(v) for v in reply.versions),
        reply.example_count,
    )


def list_heads_request() -> pb.ListHeadsRequest:
    return pb.ListHeadsRequest()


def get_head_request(tenant: str) -> pb.GetHeadRequest:
    return pb.GetHeadRequest(tenant=tenant)


def activate_request(tenant: str, version: int) -> pb.ActivateHeadVersionRequest:
    return pb.ActivateHeadVersionRequest(tenant=tenant, version=version)


def activation(reply: pb.ActivateHeadVersionResponse) -> r.Activation:
    return r.Activation(reply.tenant, reply.active_version, reply.previous_version)


def delete_request(tenant: str) -> pb.DeleteHeadRequest:
    return pb.DeleteHeadRequest(tenant=tenant)


def deletion(reply: pb.DeleteHeadResponse) -> r.Deletion:
    return r.Deletion(reply.tenant, reply.versions_deleted, reply.examples_deleted)


# -- API keys --------------------------------------------------------------------------------------------

_ROLE_CODES = {"tenant": pb.API_KEY_ROLE_TENANT, "admin": pb.API_KEY_ROLE_ADMIN}
_ROLES = {v: k for k, v in _ROLE_CODES.items()}


def create_key_request(role: str, tenant: str | None, name: str, ttl: float | None) -> pb.CreateApiKeyRequest:
    if role not in _ROLE_CODES:
        raise ValueError(f"role must be 'tenant' or 'admin', not {role!r}")
    request = pb.CreateApiKeyRequest(role=_ROLE_CODES[role], tenant=tenant or "", name=name)
    if ttl is not None:
        request.ttl.FromTimedelta(dt.timedelta(seconds=ttl))
    return request


def _time(message: pb.ApiKeyInfo, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]


def key_info(k: pb.ApiKeyInfo) -> r.ApiKeyInfo:
    created = _time(k, "created_at")
    assert created is not None, "the server always sets created_at"
    return r.ApiKeyInfo(
        k.id,
        _ROLES.get(k.role, "unknown"),
        k.tenant or None,
        k.name,
        created,
        _time(k, "expires_at"),
        _time(k, "revoked_at"),
    )


def created_key(reply: pb.CreateApiKeyResponse) -> r.CreatedApiKey:
    return r.CreatedApiKey(reply.key, key_info(reply.info))


def list_keys_request() -> pb.ListApiKeysRequest:
    return pb.ListApiKeysRequest()


def key_infos(reply: pb.ListApiKeysResponse) -> list[r.ApiKeyInfo]:
    return [key_info(k) for k in reply.keys]


def revoke_key_request(key_id: str) -> pb.RevokeApiKeyRequest:
    return pb.RevokeApiKeyRequest(id=key_id)


def revoked_key(reply: pb.RevokeApiKeyResponse) -> r.ApiKeyInfo:
    return key_info(reply.info)
