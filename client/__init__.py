"""headswap.client: call a headswap server over gRPC (needs only grpcio, protobuf and numpy)."""

from headswap.client.client import AsyncClient, Client
from headswap.client.results import (
    Activation,
    AdaptProgress,
    AdaptResult,
    BackboneInfo,
    ClassMetrics,
    Deletion,
    EmbedResult,
    HeadDetails,
    HeadMetrics,
    HeadSummary,
    HeadswapError,
    HeadVersion,
    LabelScore,
    Prediction,
    Timings,
)

__all__ = [
    "Activation",
    "AdaptProgress",
    "AdaptResult",
    "AsyncClient",
    "BackboneInfo",
    "ClassMetrics",
    "Client",
    "Deletion",
    "EmbedResult",
    "HeadDetails",
    "HeadMetrics",
    "HeadSummary",
    "HeadVersion",
    "HeadswapError",
    "LabelScore",
    "Prediction",
    "Timings",
]
