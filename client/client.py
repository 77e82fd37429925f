"""`Client` and `AsyncClient`: typed calls to a headswap server. They never return protobuf objects.

Both retry a call only when the server answers UNAVAILABLE (starting up, draining, or a connection that
broke before the call reached it), with exponential backoff, and only for calls that are safe to repeat.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc import aio

from headswap.client import _codec
from headswap.client.results import (
    Activation,
    AdaptProgress,
    AdaptResult,
    Deletion,
    EmbedResult,
    HeadDetails,
    HeadSummary,
    HeadswapError,
    Prediction,
)
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _error(exc: grpc.RpcError) -> HeadswapError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return HeadswapError(code, details or "")


def _embed_request(texts: Sequence[str], dtype: str) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not a single string: wrap it in a list")
    return pb.EmbedRequest(inputs=[pb.Input(text=t) for t in texts], dtype=_codec.element_type(dtype))


class _Base:
    def __init__(self, timeout: float | None, retries: int, backoff: float) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * (2**attempt), 5.0))


class Client(_Base):
    """Blocking client.

    >>> with Client("localhost:50051") as hs:
    ...     vectors = hs.embed(["The weather is lovely today."])  # numpy (1, 384) float32
    """

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
        super().__init__(timeout, retries, backoff)
        options = _channel_options(max_message_bytes)
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.HeadswapServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, fn: Callable[..., T], request: Any, *, retry: bool = True, timeout: float | None = None
    ) -> T:
        attempt = 0
        while True:
            try:
                return fn(request, timeout=timeout if timeout is not None else self.timeout)
            except grpc.RpcError as exc:
                if retry and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise _error(exc) from exc

    def embed(self, texts: Sequence[str], *, dtype: str = "float32") -> Any:
        """Embeddings of `texts` as a numpy array of shape (len(texts), dim)."""
        return self.embed_full(texts, dtype=dtype).embeddings

    def embed_full(self, texts: Sequence[str], *, dtype: str = "float32") -> EmbedResult:
        """Embeddings with the truncation flags, the backbone's identity and the server's timings."""
        reply = self._call(self._stub.Embed, _embed_request(texts, dtype))
        return _codec.embed_result(reply)

    def adapt_head(
        self,
        tenant: str,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        replace: bool = False,
        force_activate: bool = False,
        on_progress: Callable[[AdaptProgress], None] | None = None,
        timeout: float | None = 600.0,
        **options: Any,
    ) -> AdaptResult:
        """Train a new head version for `tenant` on these examples (added to the stored ones unless
        `replace`), and activate it unless it is no better than the majority-class baseline.

        Options: kind ("linear" or "mlp"), validation_fraction (0 trains on everything), seed, l2 (1/C),
        max_epochs, hidden_dim, dropout. Not retried: a training is not idempotent.
        """
        request = _codec.adapt_request(
            tenant, texts, labels, replace=replace, force_activate=force_activate, options=options
        )
        try:
            for reply in self._stub.AdaptHead(request, timeout=timeout):
                if reply.HasField("result"):
                    return _codec.adapt_result(reply.result)
                if on_progress is not None:
                    on_progress(_codec.adapt_progress(reply.progress))
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        raise HeadswapError(grpc.StatusCode.UNKNOWN, "AdaptHead ended without a result")

    def classify(
        self, tenant: str, texts: Sequence[str], top_k: int = 1, *, version: int = 0
    ) -> list[Prediction]:
        """Per input, the `top_k` most probable labels of the tenant's head (its active version, or
        `version`), and the version that answered."""
        reply = self._call(self._stub.Classify, _codec.classify_request(tenant, texts, top_k, version))
        return _codec.predictions(reply)

    def list_heads(self) -> list[HeadSummary]:
        return _codec.head_summaries(self._call(self._stub.ListHeads, pb.ListHeadsRequest()))

    def get_head(self, tenant: str) -> HeadDetails:
        return _codec.head_details(self._call(self._stub.GetHead, pb.GetHeadRequest(tenant=tenant)))

    def activate_head_version(self, tenant: str, version: int) -> Activation:
        r = self._call(
            self._stub.ActivateHeadVersion, pb.ActivateHeadVersionRequest(tenant=tenant, version=version)
        )
        return Activation(r.tenant, r.active_version, r.previous_version)

    def delete_head(self, tenant: str) -> Deletion:
        r = self._call(self._stub.DeleteHead, pb.DeleteHeadRequest(tenant=tenant))
        return Deletion(r.tenant, r.versions_deleted, r.examples_deleted)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health service says SERVING."""
        _wait_ready_blocking(self._channel, timeout)


class AsyncClient(_Base):
    """asyncio client; use inside a running event loop.

    >>> async with AsyncClient("localhost:50051") as hs:
    ...     vectors = await hs.embed(["It's so sunny outside!"])
    """

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
        super().__init__(timeout, retries, backoff)
        options = _channel_options(max_message_bytes)
        self._channel = (
            aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else aio.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.HeadswapServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn: Callable[..., Any], request: Any, *, retry: bool = True) -> Any:
        attempt = 0
        while True:
            try:
                return await fn(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if retry and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise _error(exc) from exc

    async def embed(self, texts: Sequence[str], *, dtype: str = "float32") -> Any:
        return (await self.embed_full(texts, dtype=dtype)).embeddings

    async def embed_full(self, texts: Sequence[str], *, dtype: str = "float32") -> EmbedResult:
        reply = await self._call(self._stub.Embed, _embed_request(texts, dtype))
        return _codec.embed_result(reply)

    async def adapt_head(
        self,
        tenant: str,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        replace: bool = False,
        force_activate: bool = False,
        on_progress: Callable[[AdaptProgress], None] | None = None,
        timeout: float | None = 600.0,
        **options: Any,
    ) -> AdaptResult:
        request = _codec.adapt_request(
            tenant, texts, labels, replace=replace, force_activate=force_activate, options=options
        )
        try:
            async for reply in self._stub.AdaptHead(request, timeout=timeout):
                if reply.HasField("result"):
                    return _codec.adapt_result(reply.result)
                if on_progress is not None:
                    on_progress(_codec.adapt_progress(reply.progress))
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        raise HeadswapError(grpc.StatusCode.UNKNOWN, "AdaptHead ended without a result")

    async def classify(
        self, tenant: str, texts: Sequence[str], top_k: int = 1, *, version: int = 0
    ) -> list[Prediction]:
        reply = await self._call(self._stub.Classify, _codec.classify_request(tenant, texts, top_k, version))
        return _codec.predictions(reply)

    async def list_heads(self) -> list[HeadSummary]:
        return _codec.head_summaries(await self._call(self._stub.ListHeads, pb.ListHeadsRequest()))

    async def get_head(self, tenant: str) -> HeadDetails:
        return _codec.head_details(await self._call(self._stub.GetHead, pb.GetHeadRequest(tenant=tenant)))

    async def activate_head_version(self, tenant: str, version: int) -> Activation:
        r = await self._call(
            self._stub.ActivateHeadVersion, pb.ActivateHeadVersionRequest(tenant=tenant, version=version)
        )
        return Activation(r.tenant, r.active_version, r.previous_version)

    async def delete_head(self, tenant: str) -> Deletion:
        r = await self._call(self._stub.DeleteHead, pb.DeleteHeadRequest(tenant=tenant))
        return Deletion(r.tenant, r.versions_deleted, r.examples_deleted)


def _wait_ready_blocking(channel: grpc.Channel, timeout: float) -> None:
    from headswap.client import _health

    _health.wait_serving(channel, timeout)
