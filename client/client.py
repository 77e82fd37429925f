"""`Client` and `AsyncClient`: typed calls to a headswap server. They never return protobuf objects.

Both build their calls in `BaseClient` and only send them: `Client` blocks, `AsyncClient` awaits. A call
is retried only when the server answers UNAVAILABLE, with exponential backoff, and only when it is safe to
repeat (AdaptHead is, by its idempotency key); failures raise a `headswap.client.errors.HeadswapError` subclass for the status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Unpack

import grpc
import numpy as np
from grpc import aio

from headswap.client import _codec
from headswap.client._base import DEFAULT_TARGET, AdaptOptions, BaseClient, Call
from headswap.client.results import (
    Activation,
    AdaptResult,
    ApiKeyInfo,
    CreatedApiKey,
    Deletion,
    EmbedResult,
    HeadDetails,
    HeadSummary,
    ImageLike,
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

    def _send(self, call: Call[T], deadline: float | Literal["call"] | None = "call") -> T:
        """The call's result, tried again while `_retry_after` allows; `deadline`: its own (the default) or
        this one (monotonic)."""
        attempt, until = 0, self._deadline() if deadline == "call" else deadline
        while True:
            try:
                if not call.stream:
                    return call.parse(self._start(call, until))
                result: Any = None
                for reply in self._start(call, until):  # to its end: the call ends OK
                    result = call.parse(reply) or result
                return result  # type: ignore[no-any-return]
            except grpc.RpcError as exc:
                time.sleep(self._retry_after(call, exc, attempt, until))
                attempt += 1

    def embed(
        self,
        texts: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        dtype: str = "float32",
        backbone: str = "",
    ) -> np.ndarray:
        """Embeddings of `texts`, or of `images` (encoded bytes or file paths), as a numpy array of shape
        (n, dim). `backbone`: a served backbone's name, when the server serves several of one input kind."""
        return self.embed_full(texts, images=images, dtype=dtype, backbone=backbone).embeddings

    def embed_full(
        self,
        texts: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        dtype: str = "float32",
        backbone: str = "",
    ) -> EmbedResult:
        """Embeddings with the truncation flags, the backbone's identity and the server's timings."""
        return self._send(self._embed(texts, images, dtype, backbone))

    def adapt_head(
        self,
        tenant: str,
        texts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        **options: Unpack[AdaptOptions],
    ) -> AdaptResult:
        """Train a new head version for `tenant` on these examples, texts or `images` (encoded bytes or file
        paths) with one label each (added to the stored ones unless `replace`), and activate it unless the
        promotion gate holds it back: negative transfer against the majority-class baseline, or
        significantly worse than the active version (`held_back_by` and `checks` say which, with the
        numbers). The head is bound to the backbone that embedded its examples.

        By default the server chooses the settings by cross-validation, calibrates the probabilities and
        refits on every example. Options (`AdaptOptions`): replace, force_activate, backbone, on_progress,
        timeout, and the training options kind ("linear" or "mlp"), validation_fraction (one held-out split
        instead of cross-validation; 0 trains on everything), seed, l2 (1/C; chosen when not given),
        max_epochs, hidden_dim, dropout. Examples past `chunk_bytes` (4 MiB) go in several calls: all but
        the last only store theirs. Each call carries an idempotency key (`request_id`, a new random one by
        default) and is retried like the other calls when the server went away (UNAVAILABLE: a restart, a
        drain, PostgreSQL down): the server answers a retry of a call it already committed with that
        call's outcome, so examples are stored and heads trained once.
        """
        calls, deadline = self._adapt(tenant, texts, images, labels, options)
        return self._adapted([self._send(call, deadline) for call in calls])

    def classify(
        self,
        tenant: str,
        texts: Sequence[str] | None = None,
        top_k: int = 1,
        *,
        images: Sequence[ImageLike] | None = None,
        version: int = 0,
        min_probability: float = 0.0,
        ignore_ood: bool = False,
    ) -> list[Prediction]:
        """Per input (texts, or `images` as bytes or paths: what the tenant's head was trained on), the
        `top_k` most probable labels of the tenant's head (its active version, or `version`), and the
        version that answered. Probabilities are calibrated; a prediction whose top probability is below
        `min_probability`, or whose input is unlike every training example (`out_of_distribution`, see
        `ood_score`), comes back with `abstained=True` (labels still listed); `ignore_ood=True` abstains by
        `min_probability` alone."""
        request = _codec.classify_request(tenant, texts, images, top_k, version, min_probability, ignore_ood)
        return self._send(Call("Classify", request, _codec.predictions))

    def list_heads(self) -> list[HeadSummary]:
        return self._send(self._list_heads())

    def get_head(self, tenant: str) -> HeadDetails:
        return self._send(self._get_head(tenant))

    def activate_head_version(self, tenant: str, version: int) -> Activation:
        return self._send(self._activate(tenant, version))

    def delete_head(self, tenant: str) -> Deletion:
        return self._send(self._delete(tenant))

    def delete_head_version(self, tenant: str, version: int) -> HeadDetails:
        """Remove one version that is not the active one; returns the head as it is then."""
        return self._send(self._delete_version(tenant, version))

    def create_api_key(
        self, role: str = "tenant", tenant: str | None = None, *, name: str = "", ttl: float | None = None
    ) -> CreatedApiKey:
        """A new key (admin only): `role` "tenant" (for `tenant`) or "admin"; `ttl` seconds, None: no expiry.
        The secret is in the result and nowhere else."""
        return self._send(self._create_key(role, tenant, name, ttl))

    def list_api_keys(self) -> list[ApiKeyInfo]:
        return self._send(self._list_keys())

    def revoke_api_key(self, key_id: str) -> ApiKeyInfo:
        return self._send(self._revoke_key(key_id))

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

    async def _send(self, call: Call[T], deadline: float | Literal["call"] | None = "call") -> T:
        attempt, until = 0, self._deadline() if deadline == "call" else deadline
        while True:
            try:
                if not call.stream:
                    return call.parse(await self._start(call, until))
                result: Any = None
                async for reply in self._start(call, until):
                    result = call.parse(reply) or result
                return result  # type: ignore[no-any-return]
            except grpc.RpcError as exc:
                await asyncio.sleep(self._retry_after(call, exc, attempt, until))
                attempt += 1

    async def embed(
        self,
        texts: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        dtype: str = "float32",
        backbone: str = "",
    ) -> np.ndarray:
        return (await self.embed_full(texts, images=images, dtype=dtype, backbone=backbone)).embeddings

    async def embed_full(
        self,
        texts: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        dtype: str = "float32",
        backbone: str = "",
    ) -> EmbedResult:
        return await self._send(self._embed(texts, images, dtype, backbone))

    async def adapt_head(
        self,
        tenant: str,
        texts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        **options: Unpack[AdaptOptions],
    ) -> AdaptResult:
        calls, deadline = self._adapt(tenant, texts, images, labels, options)
        return self._adapted([await self._send(call, deadline) for call in calls])

    async def classify(
        self,
        tenant: str,
        texts: Sequence[str] | None = None,
        top_k: int = 1,
        *,
        images: Sequence[ImageLike] | None = None,
        version: int = 0,
        min_probability: float = 0.0,
        ignore_ood: bool = False,
    ) -> list[Prediction]:
        request = _codec.classify_request(tenant, texts, images, top_k, version, min_probability, ignore_ood)
        return await self._send(Call("Classify", request, _codec.predictions))

    async def list_heads(self) -> list[HeadSummary]:
        return await self._send(self._list_heads())

    async def get_head(self, tenant: str) -> HeadDetails:
        return await self._send(self._get_head(tenant))

    async def activate_head_version(self, tenant: str, version: int) -> Activation:
        return await self._send(self._activate(tenant, version))

    async def delete_head(self, tenant: str) -> Deletion:
        return await self._send(self._delete(tenant))

    async def delete_head_version(self, tenant: str, version: int) -> HeadDetails:
        return await self._send(self._delete_version(tenant, version))

    async def create_api_key(
        self, role: str = "tenant", tenant: str | None = None, *, name: str = "", ttl: float | None = None
    ) -> CreatedApiKey:
        return await self._send(self._create_key(role, tenant, name, ttl))

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        return await self._send(self._list_keys())

    async def revoke_api_key(self, key_id: str) -> ApiKeyInfo:
        return await self._send(self._revoke_key(key_id))
