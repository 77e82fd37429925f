"""Requests from Python values, results from replies: with `_codec_keys.py` (API keys) and `_wire.py` (what
the schema says), the only client modules that touch `*_pb2` messages."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headswap.client import results as r
from headswap.client._wire import HEAD_KIND_CODES, HEAD_KINDS, from_message, head_kind_names
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


def image_bytes(item: r.ImageLike) -> bytes:
    """An image's encoded bytes: given as bytes, or read from a path."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str | os.PathLike):
        return Path(item).read_bytes()
    raise TypeError(f"an image is its encoded bytes or a path to its file, not {type(item).__name__}")


@dataclass(frozen=True)
class InputKind:
    """An input kind as this client sends it (the server's registry is `server/input_kinds.py`)."""

    argument: str  # the calls' argument: "texts", or the keyword "images=..."
    content: Callable[[Any], Any]  # one item -> the value of its `pb.Input` field (str or bytes)
    lone: tuple[type, ...]  # types of a single item passed in place of a sequence
    lone_name: str  # what the refusal calls such an item


# By the field of `pb.Input`'s `content` oneof each kind fills.
INPUT_KINDS: dict[str, InputKind] = {
    "text": InputKind("texts", lambda text: text, (str,), "a single string"),
    "image": InputKind(
        "images=...", image_bytes, (str, bytes, bytearray, memoryview, os.PathLike), "a single one"
    ),
}


def inputs(texts: Sequence[str] | None, images: Sequence[r.ImageLike] | None, call: str) -> list[pb.Input]:
    """The inputs of a call: texts, or images (bytes or paths), never both."""
    given = {field: items for field, items in (("text", texts), ("image", images)) if items is not None}
    if len(given) != 1:
        raise TypeError(
            f"{call}() takes {' or '.join(k.argument for k in INPUT_KINDS.values())}, one of the two"
        )
    ((field, items),) = given.items()
    kind = INPUT_KINDS[field]
    if isinstance(items, kind.lone):
        what = kind.argument.removesuffix("=...")
        raise TypeError(f"{call}() takes a sequence of {what}, not {kind.lone_name}: wrap it in a list")
    return [pb.Input(**{field: kind.content(item)}) for item in items]


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
        backbone=from_message(r.BackboneInfo, reply.backbone),
        timings=timings(reply.timings),
    )


# -- heads -----------------------------------------------------------------------------------------------

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
        if options["kind"] not in HEAD_KIND_CODES:
            raise ValueError(f"kind must be {head_kind_names()}, not {options['kind']!r}")
        opts.kind = HEAD_KIND_CODES[options["kind"]]
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
    return from_message(
        r.HeadMetrics,
        m,
        per_class=tuple(from_message(r.ClassMetrics, c) for c in m.per_class),
        log_loss_interval=(m.log_loss_low, m.log_loss_high) if m.HasField("log_loss_low") else None,
        expected_calibration_error_interval=(
            (m.expected_calibration_error_low, m.expected_calibration_error_high)
            if m.HasField("expected_calibration_error_low")
            else None
        ),
    )


def head_version(v: pb.HeadVersion) -> r.HeadVersion:
    return from_message(
        r.HeadVersion,
        v,
        kind=HEAD_KINDS.get(v.kind, "unknown"),
        labels=tuple(v.labels),
        metrics=head_metrics(v.metrics),
        created_at=_created(v),
    )


def _created(v: pb.HeadVersion) -> dt.datetime:
    """When a version was made, in UTC; from the deprecated seconds field when an older server sent it."""
    if v.HasField("created_at"):
        return v.created_at.ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]
    return dt.datetime.fromtimestamp(v.created_at_unix, dt.UTC)


def adapt_progress(p: pb.AdaptHeadProgress) -> r.AdaptProgress:
    return from_message(r.AdaptProgress, p)


def adapt_result(a: pb.AdaptHeadResult) -> r.AdaptResult:
    return from_message(
        r.AdaptResult,
        a,
        head=head_version(a.head) if a.HasField("head") else None,
        checks=tuple(from_message(r.PromotionCheck, c) for c in a.checks),
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
    return [from_message(r.HeadSummary, h, labels=tuple(h.labels)) for h in reply.heads]


def head_details(reply: pb.GetHeadResponse) -> r.HeadDetails:
    return from_message(r.HeadDetails, reply, versions=tuple(head_version(v) for v in reply.versions))
