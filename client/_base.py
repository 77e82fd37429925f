"""What `Client` and `AsyncClient` share: each call built as a `Call` (method, request, parser) and the
retry rule. The two clients only send."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

import grpc

from headswap.client import _codec
from headswap.client import results as r
from headswap.client.errors import HeadswapError
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class AdaptOptions(TypedDict, total=False):
    """Keyword options of `adapt_head`."""

    replace: bool  # drop the tenant's stored examples first (by default new examples are added to them)
    force_activate: bool  # promote the new version even when the promotion gate holds it back
    on_progress: Callable[[r.AdaptProgress], None]  # called with each progress message
    timeout: float | None  # deadline of the whole training, seconds (default 600)
    kind: str  # "linear" (default) or "mlp"
    # Share held out per class once, instead of cross-validating (the default); 0 trains on everything
    # without any held-out estimate, choice of l2 or calibration.
    validation_fraction: float
    seed: int
    l2: float  # L2 strength, scikit-learn's 1/C; by default chosen on the held-out predictions
    max_epochs: int
    hidden_dim: int  # mlp only
    dropout: float  # mlp only


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str  # the stub's method name
    request: Any
    parse: Callable[[Any], T]
    retry: bool = True  # safe to repeat: reads, and writes that land in the same state twice


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class BaseClient(abc.ABC):
    """`target` is host:port; `timeout` the deadline of each call (seconds, None for none); a call the server
    answered UNAVAILABLE is tried again up to `retries` times, `backoff` seconds apart and doubling;
    `credentials` makes a TLS channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._channel = self._connect(target, credentials, channel_options(max_message_bytes))
        self._stub = pb_grpc.HeadswapServiceStub(self._channel)

    @staticmethod
    @abc.abstractmethod
    def _connect(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        """The channel: blocking or asyncio, by subclass."""

    def _retry_delay(self, call: Call[Any], exc: grpc.RpcError, attempt: int) -> float | None:
        """Seconds to wait before trying `call` again, or None to give up. Only UNAVAILABLE is retried:
        the server is starting or draining, or the connection broke before the call reached it."""
        if call.retry and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
            return float(min(self.backoff * (2**attempt), 5.0))
        return None

    # -- the calls ------------------------------------------------------------------------------------------

    def _embed(self, texts: Sequence[str], dtype: str) -> Call[r.EmbedResult]:
        return Call("Embed", _codec.embed_request(texts, dtype), _codec.embed_result)

    def _classify(
        self, tenant: str, texts: Sequence[str], top_k: int, version: int, min_probability: float = 0.0
    ) -> Call[list[r.Prediction]]:
        request = _codec.classify_request(tenant, texts, top_k, version, min_probability)
        return Call("Classify", request, _codec.predictions)

    def _list_heads(self) -> Call[list[r.HeadSummary]]:
        return Call("ListHeads", _codec.list_heads_request(), _codec.head_summaries)

    def _get_head(self, tenant: str) -> Call[r.HeadDetails]:
        return Call("GetHead", _codec.get_head_request(tenant), _codec.head_details)

    def _activate(self, tenant: str, version: int) -> Call[r.Activation]:
        return Call("ActivateHeadVersion", _codec.activate_request(tenant, version), _codec.activation)

    def _delete(self, tenant: str) -> Call[r.Deletion]:
        return Call("DeleteHead", _codec.delete_request(tenant), _codec.deletion)

    @staticmethod
    def _adapt(
        tenant: str, texts: Sequence[str], labels: Sequence[str], options: AdaptOptions
    ) -> tuple[pb.AdaptHeadRequest, Callable[[r.AdaptProgress], None] | None, float | None]:
        """The request, the progress callback and the deadline of an AdaptHead call."""
        rest = {k: v for k, v in options.items() if k not in ("on_progress", "timeout")}
        request = _codec.adapt_request(tenant, texts, labels, rest)
        return request, options.get("on_progress"), options.get("timeout", 600.0)

    @staticmethod
    def _adapt_event(
        reply: pb.AdaptHeadResponse, on_progress: Callable[[r.AdaptProgress], None] | None
    ) -> r.AdaptResult | None:
        """The result, when this reply carries it; progress goes to `on_progress`."""
        if reply.HasField("result"):
            return _codec.adapt_result(reply.result)
        if on_progress is not None:
            on_progress(_codec.adapt_progress(reply.progress))
        return None

    @staticmethod
    def _no_result() -> HeadswapError:
        return HeadswapError(grpc.StatusCode.UNKNOWN, "AdaptHead ended without a result")
