"""The gRPC servicer: per method, convert the request, call a service, convert the result. No logic."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from grpc import aio

from headswap.server.domain import Caller
from headswap.server.rpc import codec
from headswap.server.rpc.interceptors import current_caller
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.heads import HeadService
from headswap.server.services.keys import KeyService
from headswap.server.services.training import TrainingService
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

Request = TypeVar("Request")
Call = TypeVar("Call")
Result = TypeVar("Result")
Reply = TypeVar("Reply")


def _unary(
    decode: Callable[[Request, Caller], Call],
    service: Callable[[HeadswapServicer], Callable[[Call], Awaitable[Result]]],
    encode: Callable[[Result], Reply],
) -> Callable[[HeadswapServicer, Request, aio.ServicerContext], Awaitable[Reply]]:
    """A method that is only: decode the request, call `service(self)` with it, encode the result."""

    async def method(self: HeadswapServicer, request: Request, context: aio.ServicerContext) -> Reply:
        return encode(await service(self)(decode(request, current_caller())))

    return method


class HeadswapServicer(pb_grpc.HeadswapServiceServicer):
    def __init__(
        self, embedding: EmbeddingService, heads: HeadService, training: TrainingService, keys: KeyService
    ) -> None:
        self.embedding = embedding
        self.heads = heads
        self.training = training
        self.keys = keys

    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        started = time.perf_counter()
        result = await self.embedding.embed(codec.embed_from_pb(request, current_caller()))
        return codec.embedded_to_pb(result, time.perf_counter() - started)

    async def AdaptHead(
        self, request: pb.AdaptHeadRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AdaptHeadResponse]:
        async for event in self.training.adapt(codec.adapt_from_pb(request, current_caller())):
            yield codec.adapt_event_to_pb(event)

    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        started = time.perf_counter()
        result = await self.heads.classify(codec.classify_from_pb(request, current_caller()))
        return codec.classified_to_pb(result, time.perf_counter() - started)

    # Convert (with the caller from the credentials), call the service, convert back: nothing else.
    ListHeads = _unary(codec.list_from_pb, lambda s: s.heads.list_heads, codec.summaries_to_pb)
    GetHead = _unary(codec.tenant_from_pb, lambda s: s.heads.get_head, codec.overview_to_pb)
    ActivateHeadVersion = _unary(codec.activate_from_pb, lambda s: s.heads.activate, codec.activation_to_pb)
    DeleteHead = _unary(codec.tenant_from_pb, lambda s: s.heads.delete, codec.deletion_to_pb)
    DeleteHeadVersion = _unary(
        codec.version_from_pb, lambda s: s.heads.delete_version, codec.version_deleted_to_pb
    )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        return codec.created_key_to_pb(
            *await self.keys.create(codec.create_key_from_pb(request, current_caller()))
        )

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        return codec.keys_to_pb(await self.keys.list(current_caller()))

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        return codec.revoked_to_pb(await self.keys.revoke(request.id, current_caller()))
