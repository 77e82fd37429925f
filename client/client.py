"""`Client` and `AsyncClient`: typed calls to a headswap server. They never return protobuf objects.

Both build their calls in `BaseClient` and only send them: `Client` blocks, `AsyncClient` awaits. A call
is retried only when the server answers UNAVAILABLE, with exponential backoff, and only when it is safe to
repeat; failures raise a `headswap.client.errors.HeadswapError` subclass for the status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TypeVar, Unpack

import grpc
import numpy as np
from grpc import aio

from headswap.client._base import DEFAULT_TARGET, AdaptOptions, BaseClient, Call
from headswap.client.errors import from_rpc_error
from headswap.client.results import (
    Activation,
    AdaptResult,
    Deletion,
    EmbedResult,
    HeadDetails,
    HeadSummary,
    Prediction,
)

T = TypeVar("T")

__all__ = ["DEFAULT_TARGET", "AsyncClient", "Client"]


class Client(BaseClient):
    """Blocking client.

    >>> with Client("localhost:50051") as hs:
    ...     vectors = hs.embed(["The weather is lovely today."])  # numpy (1, 384) float32
    """

    @staticmethod
    def _connect(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                return call.parse(getattr(self._stub, call.method)(call.request, timeout=self.timeout))
            except grpc.RpcError as exc:
                delay = self._retry_delay(call, exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc) from exc
                time.sleep(delay)
                attempt += 1

    def embed(self, texts: Sequence[str], *, dtype: str = "float32") -> np.ndarray:
        """Embeddings of `texts` as a numpy array of shape (len(texts), dim)."""
        return self.embed_full(texts, dtype=dtype).embeddings

    def embed_full(self, texts: Sequence[str], *, dtype: str = "float32") -> EmbedResult:
        """Embeddings with the truncation flags, the backbone's identity and the server's timings."""
        return self._send(self._embed(texts, dtype))

    def adapt_head(
        self, tenant: str, texts: Sequence[str], labels: Sequence[str], **options: Unpack[AdaptOptions]
    ) -> AdaptResult:
        """Train a new head version for `tenant` on these examples (added to the stored ones unless
        `replace`), and activate it unless the promotion gate holds it back: negative transfer against the
        majority-class baseline, or significantly worse than the active version (`held_back_by` and
        `checks` say which, with the numbers).

        By default the server chooses the settings by cross-validation, calibrates the probabilities and
        refits on every example. Options (`AdaptOptions`): replace, force_activate, on_progress, timeout,
        and the training options kind ("linear" or "mlp"), validation_fraction (one held-out split instead
        of cross-validation; 0 trains on everything), seed, l2 (1/C; chosen when not given), max_epochs,
        hidden_dim, dropout. Not retried: a training is not idempotent.
        """
        request, on_progress, timeout = self._adapt(tenant, texts, labels, options)
        try:
            for reply in self._stub.AdaptHead(request, timeout=timeout):
                if (result := self._adapt_event(reply, on_progress)) is not None:
                    return result
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        raise self._no_result()

    def classify(
        self,
        tenant: str,
        texts: Sequence[str],
        top_k: int = 1,
        *,
        version: int = 0,
        min_probability: float = 0.0,
    ) -> list[Prediction]:
        """Per input, the `top_k` most probable labels of the tenant's head (its active version, or
        `version`), and the version that answered. Probabilities are calibrated; a prediction whose top
        probability is below `min_probability` comes back with `abstained=True` (labels still listed)."""
        return self._send(self._classify(tenant, texts, top_k, version, min_probability))

    def list_heads(self) -> list[HeadSummary]:
        return self._send(self._list_heads())

    def get_head(self, tenant: str) -> HeadDetails:
        return self._send(self._get_head(tenant))

    def activate_head_version(self, tenant: str, version: int) -> Activation:
        return self._send(self._activate(tenant, version))

    def delete_head(self, tenant: str) -> Deletion:
        return self._send(self._delete(tenant))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health service says SERVING."""
        from headswap.client import _health

        _health.wait_serving(self._channel, timeout)


class AsyncClient(BaseClient):
    """asyncio client with `Client`'s methods as coroutines; use inside a running event loop.

    >>> async with AsyncClient("localhost:50051") as hs:
    ...     vectors = await hs.embed(["It's so sunny outside!"])
    """

    @staticmethod
    def _connect(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        if credentials is not None:
            return aio.secure_channel(target, credentials, options=options)
        return aio.insecure_channel(target, options=options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                return call.parse(await getattr(self._stub, call.method)(call.request, timeout=self.timeout))
            except grpc.RpcError as exc:
                delay = self._retry_delay(call, exc, attempt)
                if delay is None:
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(delay)
                attempt += 1

    async def embed(self, texts: Sequence[str], *, dtype: str = "float32") -> np.ndarray:
        return (await self.embed_full(texts, dtype=dtype)).embeddings

    async def embed_full(self, texts: Sequence[str], *, dtype: str = "float32") -> EmbedResult:
        return await self._send(self._embed(texts, dtype))

    async def adapt_head(
        self, tenant: str, texts: Sequence[str], labels: Sequence[str], **options: Unpack[AdaptOptions]
    ) -> AdaptResult:
        request, on_progress, timeout = self._adapt(tenant, texts, labels, options)
        try:
            async for reply in self._stub.AdaptHead(request, timeout=timeout):
                if (result := self._adapt_event(reply, on_progress)) is not None:
                    return result
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        raise self._no_result()

    async def classify(
        self,
        tenant: str,
        texts: Sequence[str],
        top_k: int = 1,
        *,
        version: int = 0,
        min_probability: float = 0.0,
    ) -> list[Prediction]:
        return await self._send(self._classify(tenant, texts, top_k, version, min_probability))

    async def list_heads(self) -> list[HeadSummary]:
        return await self._send(self._list_heads())

    async def get_head(self, tenant: str) -> HeadDetails:
        return await self._send(self._get_head(tenant))

    async def activate_head_version(self, tenant: str, version: int) -> Activation:
        return await self._send(self._activate(tenant, version))

    async def delete_head(self, tenant: str) -> Deletion:
        return await self._send(self._delete(tenant))
