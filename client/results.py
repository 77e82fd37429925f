"""What the client returns: plain dataclasses and numpy arrays, never protobuf objects."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np


class HeadswapError(Exception):
    """A call failed; `code` is the gRPC status code and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    fingerprint: str
    embedding_dim: int
    input_kind: str
    max_length: int
    provider: str


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
