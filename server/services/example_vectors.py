"""A training's vectors: each example's embedding from the cache (this process's, then the store's) where
it is there, the rest embedded through the serving lane in chunks the queue can always admit; the new ones
kept in the store after the commit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from headswap.server.cache import EmbeddingCache
from headswap.server.config import LimitsConfig
from headswap.server.domain import Input, Progress
from headswap.server.errors import InputError, InvalidArgument
from headswap.server.inference.lanes import Lane
from headswap.server.metrics import Metrics
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.heads import HeadService
from headswap.server.services.locks import TenantLock

log = logging.getLogger("headswap.server.services.training")

EMBED_CHUNK = 256


@dataclass(eq=False)
class ExampleVectors:
    embedding: EmbeddingService
    heads: HeadService
    cache: EmbeddingCache
    limits: LimitsConfig
    metrics: Metrics

    async def vectors(
        self,
        tenant: str,
        lane: Lane,
        inputs: list[Input],
        report: Callable[[Progress], None],
        deadline: float,
        name: Callable[[int], str] = lambda i: f"examples[{i}]",
    ) -> tuple[np.ndarray, int, int, dict[bytes, np.ndarray]]:
        """Vectors for `inputs`, from the cache where possible; returns (vectors, embedded, hits, and the
        vectors for the store's cache: empty when nothing new was embedded)."""
        if not inputs:  # a store_only call that only replaces the examples with none
            return np.zeros((0, lane.backbone.dim), dtype=np.float32), 0, 0, {}
        # One key per precision: a training's vectors all come from the precision this lane serves, never a
        # mix of fp32 and int8 ones cached by replicas of the fleet that serve another.
        cache_key = lane.backbone.embedding_key
        keys = [item.content_key() for item in inputs]
        found = self.cache.get_many(cache_key, keys, tenant)
        if len(found) < len(set(keys)):
            stored = await self.heads.run_io(self.heads.store.cached_embeddings, tenant, cache_key)
            if dropped := getattr(stored, "dropped", 0):
                self.metrics.cache_damaged.inc(dropped)
                log.warning(
                    "tenant %s: %d damaged cached embedding(s) dropped, embedded again", tenant, dropped
                )
            found.update({k: v for k, v in stored.items() if k not in found})
        missing: dict[bytes, Input] = {}
        for key, item in zip(keys, inputs, strict=True):
            if key not in found:
                missing[key] = item
        hits = len(inputs) - sum(1 for k in keys if k in missing)
        todo = list(missing.items())
        # Chunks the queue can always admit, however small it is configured.
        chunk = max(
            1,
            min(self.limits.max_batch_inputs, EMBED_CHUNK, lane.batcher.policy.max_queue_items // 2),
        )
        report(Progress("embedding", 0, len(todo)))
        fresh: dict[bytes, np.ndarray] = {}
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # an input's first place, for messages
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            try:
                vectors = await self.embedding.vectors(lane, [item for _, item in part], deadline, tenant)
            except InputError as exc:  # its index is within the chunk: say which example it is
                raise InvalidArgument(f"{name(first[part[exc.index][0]])} {exc.reason}") from None
            fresh.update({k: vectors[i] for i, (k, _) in enumerate(part)})
            report(Progress("embedding", min(start + chunk, len(todo)), len(todo)))
        self.cache.count(hits, len(todo))
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(todo))
        self.cache.put_many(cache_key, {**found, **fresh}, tenant)
        found.update(fresh)
        vectors = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
        # Nothing new embedded: the stored cache has nothing to gain (10,000 vectors are 15 MB).
        to_save = dict(zip(keys, vectors, strict=True)) if todo else {}
        return vectors, len(todo), hits, to_save

    async def save(self, lock: TenantLock, tenant: str, lane: Lane, entries: dict[bytes, np.ndarray]) -> None:
        """Keep the vectors in the store, after the commit (the store never creates a tenant for a cache)."""
        if not entries:
            return
        try:
            await self.heads.run_held(
                lock, self.heads.store.save_embeddings, tenant, lane.backbone.embedding_key, entries
            )
        except Exception as exc:  # a cache: failing to keep it costs time later, never this training
            self.metrics.cache_write_errors.inc()
            log.warning("tenant %s: embedding cache not saved (%s)", tenant, exc)
