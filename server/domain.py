"""Plain values passed between the servicer and the service layers (no protobuf past the edge)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass(frozen=True)
class Embedded:
    embeddings: np.ndarray  # float32 (n, dim)
    truncated: np.ndarray  # bool (n,)
    timings: Timings
