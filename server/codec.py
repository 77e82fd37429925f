"""Protobuf <-> domain values. With the servicer, the only module that touches `*_pb2` types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from headswap.adapters import HeadMetrics, TrainConfig
from headswap.server.domain import BackboneDescription, Embedded, Timings
from headswap.server.errors import InvalidArgument
from headswap.server.heads import AdaptOutcome, AdaptRequest, Classified, HeadOverview, Progress, VersionInfo
from headswap.server.store import Example
from headswap.v1 import headswap_pb2 as pb

_DTYPES: dict[int, np.dtype] = {
    pb.ELEMENT_TYPE_UNSPECIFIED: np.dtype("<f4"),
    pb.ELEMENT_TYPE_FLOAT32: np.dtype("<f4"),
    pb.ELEMENT_TYPE_FLOAT16: np.dtype("<f2"),
}


def texts_from_inputs(inputs: Iterable[pb.Input], input_kind: str, what: str = "inputs") -> list[str]:
    texts = []
    for i, item in enumerate(inputs):
        kind = item.WhichOneof("content")
        if kind == "text":
            texts.append(item.text)
        elif kind == "image":
            raise InvalidArgument(
                f"{what}[{i}] is an image, but this server's backbone takes {input_kind}: send `text`"
            )
        else:
            raise InvalidArgument(f"{what}[{i}] has no content: set `text`")
    return texts


def element_type(value: int) -> np.dtype:
    try:
        return _DTYPES[value]
    except KeyError:
        raise InvalidArgument(
            f"unknown element type {value}: use ELEMENT_TYPE_FLOAT32 or ELEMENT_TYPE_FLOAT16"
        ) from None


def tensor(array: np.ndarray, dtype: np.dtype) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype=dtype)
    code = pb.ELEMENT_TYPE_FLOAT16 if dtype == np.dtype("<f2") else pb.ELEMENT_TYPE_FLOAT32
    return pb.Tensor(dtype=code, shape=list(data.shape), data=data.tobytes())


def backbone_info(desc: BackboneDescription) -> pb.BackboneInfo:
    return pb.BackboneInfo(
        name=desc.name,
        fingerprint=desc.fingerprint,
        embedding_dim=desc.embedding_dim,
        input_kind=desc.input_kind,
        max_length=desc.max_length,
        provider=desc.provider,
    )


def timings(t: Timings, total_s: float) -> pb.Timings:
    us = 1_000_000
    return pb.Timings(
        queue_us=int(t.queue_s * us),
        preprocess_us=int(t.preprocess_s * us),
        backbone_us=int(t.backbone_s * us),
        head_us=int(t.head_s * us),
        total_us=int(total_s * us),
    )


def embed_response(
    result: Embedded, dtype: np.dtype, desc: BackboneDescription, total_s: float
) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=tensor(result.embeddings, dtype),
        truncated=result.truncated.tolist(),
        backbone=backbone_info(desc),
        timings=timings(result.timings, total_s),
    )


# -- heads -----------------------------------------------------------------------------------------------

MAX_EPOCHS = 10_000
MAX_HIDDEN_DIM = 8192
_KINDS = {pb.HEAD_KIND_UNSPECIFIED: "linear", pb.HEAD_KIND_LINEAR: "linear", pb.HEAD_KIND_MLP: "mlp"}
_KIND_CODES = {"linear": pb.HEAD_KIND_LINEAR, "mlp": pb.HEAD_KIND_MLP}


def train_config(options: pb.TrainingOptions, device: str) -> TrainConfig:
    """Zero values mean the defaults; anything out of range is INVALID_ARGUMENT with the reason."""
    if options.kind not in _KINDS:
        raise InvalidArgument(f"unknown head kind {options.kind}: use HEAD_KIND_LINEAR or HEAD_KIND_MLP")
    defaults = TrainConfig()
    # Bounds that keep one training from taking the server's memory or hours of its time.
    if not 0 <= options.max_epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"max_epochs must be between 1 and {MAX_EPOCHS}, not {options.max_epochs}")
    if not 0 <= options.hidden_dim <= MAX_HIDDEN_DIM:
        raise InvalidArgument(f"hidden_dim must be between 1 and {MAX_HIDDEN_DIM}, not {options.hidden_dim}")
    if options.no_validation and options.validation_fraction:
        raise InvalidArgument("set validation_fraction or no_validation, not both")
    fraction = 0.0 if options.no_validation else (options.validation_fraction or defaults.validation_fraction)
    try:
        return TrainConfig(
            kind=_KINDS[options.kind],
            validation_fraction=fraction,
            seed=int(options.seed),
            l2=options.l2 or defaults.l2,
            max_epochs=options.max_epochs or defaults.max_epochs,
            hidden_dim=options.hidden_dim or defaults.hidden_dim,
            dropout=options.dropout or defaults.dropout,
            device=device,
        )
    except ValueError as exc:
        raise InvalidArgument(f"bad training options: {exc}") from None


def adapt_request(request: pb.AdaptHeadRequest, input_kind: str, device: str) -> AdaptRequest:
    if request.mode not in (pb.EXAMPLE_MODE_UNSPECIFIED, pb.EXAMPLE_MODE_ADD, pb.EXAMPLE_MODE_REPLACE):
        raise InvalidArgument(
            f"unknown example mode {request.mode}: use EXAMPLE_MODE_ADD or EXAMPLE_MODE_REPLACE"
        )
    texts = texts_from_inputs((e.input for e in request.examples), input_kind, what="examples")
    return AdaptRequest(
        tenant=request.tenant,
        examples=[Example(t, e.label) for t, e in zip(texts, request.examples, strict=True)],
        replace=request.mode == pb.EXAMPLE_MODE_REPLACE,
        force_activate=request.force_activate,
        config=train_config(request.options, device),
    )


def head_metrics(m: HeadMetrics, labels: Sequence[str]) -> pb.HeadMetrics:
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
    )


def head_version(v: VersionInfo) -> pb.HeadVersion:
    return pb.HeadVersion(
        version=v.version,
        kind=_KIND_CODES[v.kind],
        labels=list(v.labels),
        metrics=head_metrics(v.metrics, v.labels),
        created_at=v.created_at,
        backbone_fingerprint=v.fingerprint,
        example_count=v.example_count,
    )


def adapt_event(event: Progress | AdaptOutcome) -> pb.AdaptHeadResponse:
    if isinstance(event, Progress):
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
            head=head_version(event.head),
            activated=event.activated,
            active_version=event.active_version,
            embedded=event.embedded,
            cache_hits=event.cache_hits,
        )
    )


def classify_response(result: Classified, desc: BackboneDescription, total_s: float) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        predictions=[
            pb.Prediction(
                labels=[pb.LabelScore(label=name, probability=p) for name, p in row], truncated=bool(cut)
            )
            for row, cut in zip(result.labels, result.truncated, strict=True)
        ],
        version=result.version,
        backbone=backbone_info(desc),
        timings=timings(result.timings, total_s),
    )


def get_head_response(o: HeadOverview) -> pb.GetHeadResponse:
    return pb.GetHeadResponse(
        tenant=o.tenant,
        active_version=o.active_version,
        versions=[head_version(v) for v in o.versions],
        example_count=o.example_count,
    )
