"""headswap.client: call a headswap server over gRPC (needs only grpcio, protobuf and numpy)."""

from headswap.client.client import AsyncClient, Client
from headswap.client.results import BackboneInfo, EmbedResult, HeadswapError, Timings

__all__ = ["AsyncClient", "BackboneInfo", "Client", "EmbedResult", "HeadswapError", "Timings"]
