"""One forward pass over a formed batch, in the backbone's thread: collate (padded to a shape bucket's when
buckets are on), encode, then every tenant's head in one grouped operation; and the warm-up of each bucket's
shape before serving."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.calls import Item
from headswap.server.inference.protocols import Backbone


class GroupedHeads(Protocol):
    # One row per embedding: what the tenant's head answers (the server's: probabilities and an OOD score).
    def apply(self, embeddings: np.ndarray, slots: list[int]) -> Sequence[Any]: ...


@dataclass(frozen=True)
class BatchStats:
    items: int
    requests: int
    padded_cost: int
    real_cost: int
    run_s: float


class Forward:
    def __init__(
        self,
        backbone: Backbone,
        heads: GroupedHeads | None,
        buckets: ShapeBuckets | None,
        on_batch: Callable[[BatchStats], None] | None,
    ) -> None:
        self.preprocessor = backbone.preprocessor
        self.encoder = backbone.encoder
        self.heads = heads
        self.buckets = buckets
        self.on_batch = on_batch

    def warm_buckets(self) -> int:
        """Blocking (the backbone's thread): run every bucket's shape once; returns how many ran."""
        if self.buckets is None:
            return 0
        shapes = self.buckets.shapes()
        for rows, length in shapes:
            item = self.preprocessor.placeholder(length)  # type: ignore[attr-defined]
            self.encoder.run(self.preprocessor.collate([item], (rows, length)))  # type: ignore[call-arg]
        return len(shapes)

    def run(self, batch: list[Item], spare_core: bool = False) -> tuple[list[Any], float, float]:
        """In the backbone thread: one forward pass, then every tenant's head in one grouped operation.
        `spare_core`: the server is refusing calls (the encoder leaves a core to the event loop if it can)."""
        # A caller may have gone while this batch waited behind the previous one: drop its items now, before
        # they cost backbone time. (Reading a future's state from this thread is a plain attribute read.)
        live = [i for i, item in enumerate(batch) if not item.request.cancelled]
        rows: list[Any] = [None] * len(batch)
        if not live:
            return rows, 0.0, 0.0
        t0 = time.perf_counter()
        for i in live:
            # Stamped here, in the backbone thread: time waiting behind the previous batch is queue time.
            if not batch[i].request.started:
                batch[i].request.started = t0
        items = [batch[i] for i in live]
        prepared = [item.prepared for item in items]
        costs = [p.cost for p in prepared]
        if self.buckets is None:
            embeddings = self.encoder.run(self.preprocessor.collate(prepared), spare_core)
            padded_cost = max(costs) * len(items)
        else:
            # A text's group key is its token length; images have no length axis (their buckets: rows only).
            shape = self.buckets.shape(len(prepared), max(p.group_key for p in prepared))
            embeddings = self.encoder.run(self.preprocessor.collate(prepared, shape), spare_core)[
                : len(prepared)
            ]
            padded_cost = shape[0] * (shape[1] or max(costs))
        t1 = time.perf_counter()
        for i, row in zip(live, embeddings, strict=True):
            rows[i] = row
        with_head = [i for i, item in enumerate(items) if item.request.slot is not None]
        if with_head:
            if self.heads is None:
                raise RuntimeError("a Classify item reached a batcher without heads")
            slots = [int(items[i].request.slot) for i in with_head]  # type: ignore[arg-type]
            for i, probs in zip(with_head, self.heads.apply(embeddings[with_head], slots), strict=True):
                rows[live[i]] = probs
        t2 = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(
                BatchStats(
                    items=len(items),
                    requests=len({id(item.request) for item in items}),
                    padded_cost=padded_cost,
                    real_cost=sum(costs),
                    run_s=t1 - t0,
                )
            )
        return rows, t1 - t0, t2 - t1
