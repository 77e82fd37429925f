"""Protobuf <-> domain values. With the servicer, the only module that touches `*_pb2` types."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from headswap.server.domain import BackboneDescription, Embedded, Timings
from headswap.server.errors import InvalidArgument
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
