"""Embed: inputs to embeddings through the batcher."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.server.config import LimitsConfig
from headswap.server.domain import Embedded, EmbedRequest, Input, Timings, call_deadline
from headswap.server.errors import InvalidArgument, ResourceExhausted
from headswap.server.inference.batcher import Batcher, BatchResult
from headswap.server.inference.protocols import Backbone
from headswap.server.metrics import Metrics
from headswap.server.validation import check_inputs

DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
REPLY_OVERHEAD = 64 * 1024  # room for everything in a reply besides the payload


def timings(result: BatchResult) -> Timings:
    return Timings(result.queue_s, result.preprocess_s, result.backbone_s, result.head_s)


@dataclass(eq=False)
class EmbeddingService:
    backbone: Backbone
    batcher: Batcher
    limits: LimitsConfig
    metrics: Metrics

    def check(self, inputs: tuple[Input, ...], what: str = "inputs") -> None:
        kind, limits = self.backbone.manifest.input_kind, self.limits
        check_inputs(inputs, limits.max_batch_inputs, kind, what, limits.max_request_bytes)

    def check_reply_size(self, payload_bytes: int, hint: str) -> None:
        """Refuse before the backbone runs: the transport would only find out when sending the reply."""
        limit = self.limits.max_message_bytes - REPLY_OVERHEAD
        if payload_bytes > limit:
            raise ResourceExhausted(
                f"the reply would carry {payload_bytes} bytes, over this server's message limit of "
                f"{self.limits.max_message_bytes} bytes: {hint}"
            )

    async def embed(self, request: EmbedRequest) -> Embedded:
        dtype = DTYPES.get(request.dtype)
        if dtype is None:
            raise InvalidArgument(f"unknown element type {request.dtype!r}: use float32 or float16")
        self.check(request.inputs)
        self.check_reply_size(
            len(request.inputs) * self.backbone.dim * dtype.itemsize,
            "send fewer inputs per call or ask for float16",
        )
        result = await self.batcher.submit(request.inputs, deadline=call_deadline.get())
        t = timings(result)
        self.metrics.observe_stages(t.queue_s, t.preprocess_s, t.backbone_s, None)
        embeddings = np.stack(result.rows).astype(dtype, copy=False)
        return Embedded(embeddings, result.truncated, t, self.backbone.describe())

    async def vectors(self, inputs: list[Input], deadline: float) -> np.ndarray:
        """float32 (n, dim) for inputs already checked (training examples). A training is no call waiting
        on its answer: when the queue is full it waits for room (with backoff) until `deadline`."""
        delay = 0.05
        while True:
            try:
                result = await self.batcher.submit(inputs)
                return np.stack(result.rows).astype(np.float32, copy=False)
            except ResourceExhausted:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
