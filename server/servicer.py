"""The gRPC servicer: protobuf in, domain calls, protobuf out. No logic of its own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from grpc import aio

from headswap.server import codec
from headswap.server.errors import ResourceExhausted
from headswap.server.heads import HeadService
from headswap.server.metrics import Metrics
from headswap.server.service import EmbeddingService
from headswap.server.validation import check_texts
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc


class HeadswapServicer(pb_grpc.HeadswapServiceServicer):
    def __init__(
        self,
        embedding: EmbeddingService,
        heads: HeadService,
        max_message_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.embedding = embedding
        self.heads = heads
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    def _check_reply_size(self, payload_bytes: int) -> None:
        # Refuse before the backbone runs: gRPC would only find out when sending the finished reply.
        limit = self.max_message_bytes - 64 * 1024
        if payload_bytes > limit:
            raise ResourceExhausted(
                f"the reply would carry {payload_bytes} bytes of embeddings, over this server's message "
                f"limit of {self.max_message_bytes} bytes: send fewer inputs per call or ask for float16"
            )

    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        started = time.perf_counter()
        backbone = self.embedding.backbone  # UNAVAILABLE until warmed up
        dtype = codec.element_type(request.dtype)
        texts = codec.texts_from_inputs(request.inputs, backbone.manifest.input_kind)
        check_texts(texts, self.embedding.config.max_batch_inputs)
        self._check_reply_size(len(texts) * backbone.dim * dtype.itemsize)
        result = await self.embedding.embed(texts)
        if self.metrics is not None:
            t = result.timings
            self.metrics.observe_stages(t.queue_s, t.preprocess_s, t.backbone_s, None)
        return codec.embed_response(result, dtype, self.embedding.describe(), time.perf_counter() - started)

    async def AdaptHead(
        self, request: pb.AdaptHeadRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AdaptHeadResponse]:
        backbone = self.embedding.backbone
        adapt = codec.adapt_request(request, backbone.manifest.input_kind, self.embedding.config.device)
        async for event in self.heads.adapt(adapt):
            yield codec.adapt_event(event)

    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        started = time.perf_counter()
        backbone = self.embedding.backbone
        texts = codec.texts_from_inputs(request.inputs, backbone.manifest.input_kind)
        result = await self.heads.classify(request.tenant, texts, request.top_k, request.version)
        if self.metrics is not None:
            t = result.timings
            self.metrics.observe_stages(t.queue_s, t.preprocess_s, t.backbone_s, t.head_s)
        return codec.classify_response(result, self.embedding.describe(), time.perf_counter() - started)

    async def ListHeads(
        self, request: pb.ListHeadsRequest, context: aio.ServicerContext
    ) -> pb.ListHeadsResponse:
        rows = await self.heads.list_heads()
        return pb.ListHeadsResponse(
            heads=[
                pb.HeadSummary(
                    tenant=t, active_version=a, version_count=n, labels=list(labels), backbone_fingerprint=fp
                )
                for t, a, n, labels, fp in rows
            ]
        )

    async def GetHead(self, request: pb.GetHeadRequest, context: aio.ServicerContext) -> pb.GetHeadResponse:
        return codec.get_head_response(await self.heads.get_head(request.tenant))

    async def ActivateHeadVersion(
        self, request: pb.ActivateHeadVersionRequest, context: aio.ServicerContext
    ) -> pb.ActivateHeadVersionResponse:
        active, previous = await self.heads.activate(request.tenant, request.version)
        return pb.ActivateHeadVersionResponse(
            tenant=request.tenant, active_version=active, previous_version=previous
        )

    async def DeleteHead(
        self, request: pb.DeleteHeadRequest, context: aio.ServicerContext
    ) -> pb.DeleteHeadResponse:
        versions, examples = await self.heads.delete(request.tenant)
        return pb.DeleteHeadResponse(
            tenant=request.tenant, versions_deleted=versions, examples_deleted=examples
        )
