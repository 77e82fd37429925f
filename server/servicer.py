"""The gRPC servicer: protobuf in, domain calls, protobuf out. No logic of its own."""

from __future__ import annotations

import time

from grpc import aio

from headswap.server import codec
from headswap.server.errors import ResourceExhausted
from headswap.server.service import EmbeddingService
from headswap.server.validation import check_texts
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc


class HeadswapServicer(pb_grpc.HeadswapServiceServicer):
    def __init__(self, embedding: EmbeddingService, max_message_bytes: int) -> None:
        self.embedding = embedding
        self.max_message_bytes = max_message_bytes

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
        return codec.embed_response(result, dtype, self.embedding.describe(), time.perf_counter() - started)
