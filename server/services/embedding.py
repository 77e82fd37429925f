"""Embed: inputs to embeddings through the batcher."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.server.config import LimitsConfig
from headswap.server.domain import ANONYMOUS, Caller, Embedded, EmbedRequest, Input, Timings, call_deadline
from headswap.server.errors import InvalidArgument, ResourceExhausted
from headswap.server.inference.batcher import BatchResult
from headswap.server.inference.lanes import Lane, Lanes
from headswap.server.metrics import Metrics
from headswap.server.validation import check_inputs

DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
REPLY_OVERHEAD = 64 * 1024  # room for everything in a reply besides the payload


def caller_flow(caller: Caller) -> str:
    """Whose work an Embed is, for the batcher's turns: a tenant key's tenant, an admin key; without keys
    every call is its own flow (nothing tells callers apart)."""
    if caller.tenant is not None:
        return f"tenant:{caller.tenant}"
    return f"key:{caller.name}" if caller.name != ANONYMOUS.name else ""


def timings(result: BatchResult) -> Timings:
    return Timings(result.queue_s, result.preprocess_s, result.backbone_s, result.head_s)


@dataclass(eq=False)
class EmbeddingService:
    lanes: Lanes
    limits: LimitsConfig
    metrics: Metrics

    def check(self, inputs: tuple[Input, ...], lane: Lane | None, target: str = "") -> None:
        """Counts and bytes within the limits, no blank input, every input of the lane's kind (if given)."""
        limits = self.limits
        kind = lane.kind if lane is not None else None
        target = target or (f"backbone {lane.name!r}" if lane is not None else "")
        check_inputs(inputs, limits.max_batch_inputs, kind, "inputs", limits.max_request_bytes, target)

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
        lane = self.lanes.for_inputs(request.inputs, request.backbone)
        self.check(request.inputs, lane)
        self.check_reply_size(
            len(request.inputs) * lane.backbone.dim * dtype.itemsize,
            "send fewer inputs per call or ask for float16",
        )
        result = await lane.batcher.submit(
            request.inputs, deadline=call_deadline.get(), flow=caller_flow(request.caller)
        )
        t = timings(result)
        self.metrics.observe_stages(t.queue_s, t.preprocess_s, t.backbone_s, None)
        embeddings = np.stack(result.rows).astype(dtype, copy=False)
        return Embedded(embeddings, result.truncated, t, lane.describe())

    async def vectors(self, lane: Lane, inputs: list[Input], deadline: float, tenant: str = "") -> np.ndarray:
        """float32 (n, dim) for inputs already checked (training examples). A training is no call waiting
        on its answer: when the queue is full it waits for room (with backoff) until `deadline`. Its work is
        a flow of its own (`train:<tenant>`), taking turns with serving rather than crowding it out."""
        delay = 0.05
        while True:
            try:
                result = await lane.batcher.submit(inputs, flow=f"train:{tenant}" if tenant else "")
                return np.stack(result.rows).astype(np.float32, copy=False)
            except ResourceExhausted:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
