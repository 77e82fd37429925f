"""Protobuf replies -> client results. The only client module that reads `*_pb2` messages."""

from __future__ import annotations

import numpy as np

from headswap.client.results import BackboneInfo, EmbedResult, Timings
from headswap.v1 import headswap_pb2 as pb

_ELEMENT_TYPES = {"float32": pb.ELEMENT_TYPE_FLOAT32, "float16": pb.ELEMENT_TYPE_FLOAT16}
_NUMPY: dict[int, np.dtype] = {
    pb.ELEMENT_TYPE_FLOAT32: np.dtype("<f4"),
    pb.ELEMENT_TYPE_FLOAT16: np.dtype("<f2"),
}


def element_type(name: str) -> int:
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


def backbone(b: pb.BackboneInfo) -> BackboneInfo:
    return BackboneInfo(b.name, b.fingerprint, b.embedding_dim, b.input_kind, b.max_length, b.provider)


def timings(t: pb.Timings) -> Timings:
    ms = 1000.0
    return Timings(t.queue_us / ms, t.preprocess_us / ms, t.backbone_us / ms, t.head_us / ms, t.total_us / ms)


def embed_result(reply: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(
        embeddings=tensor(reply.embeddings),
        truncated=tuple(reply.truncated),
        backbone=backbone(reply.backbone),
        timings=timings(reply.timings),
    )
