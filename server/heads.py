"""Tenant heads: AdaptHead, Classify and head management, on top of the backbone, store and head bank."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headswap.adapters import (
    HeadMetrics,
    TrainConfig,
    TrainedHead,
    TrainingDivergedError,
    TrainingInputError,
    TrainProgress,
    head_to_bytes,
    metrics_from_manifest,
    min_examples_per_class,
    top_k,
    train_head,
)
from headswap.server.cache import EmbeddingCache, content_key
from headswap.server.config import ServerConfig
from headswap.server.domain import Timings
from headswap.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from headswap.server.headbank import HeadBank, LiveHead
from headswap.server.metrics import Metrics
from headswap.server.service import EmbeddingService
from headswap.server.store import Example, HeadStore
from headswap.server.validation import check_tenant, check_texts

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class AdaptRequest:
    tenant: str
    examples: list[Example]
    replace: bool = False
    force_activate: bool = False
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class Progress:
    stage: str  # "embedding" or "training"
    done: int
    total: int
    train_loss: float = 0.0
    validation_loss: float | None = None
    validation_accuracy: float | None = None


@dataclass(frozen=True)
class VersionInfo:
    version: int
    kind: str
    labels: tuple[str, ...]
    metrics: HeadMetrics
    created_at: float
    fingerprint: str
    example_count: int

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> VersionInfo:
        return cls(
            version=int(manifest["version"]),
            kind=str(manifest["spec"]["kind"]),
            labels=tuple(manifest["labels"]),
            metrics=metrics_from_manifest(manifest),
            created_at=float(manifest["created_at"]),
            fingerprint=str(manifest["backbone_fingerprint"]),
            example_count=int(manifest["example_count"]),
        )


@dataclass(frozen=True)
class AdaptOutcome:
    tenant: str
    head: VersionInfo
    activated: bool
    active_version: int
    embedded: int
    cache_hits: int


@dataclass(frozen=True)
class Classified:
    labels: list[list[tuple[str, float]]]  # per input, most probable first
    truncated: np.ndarray
    version: int
    timings: Timings


@dataclass(frozen=True)
class HeadOverview:
    tenant: str
    active_version: int
    versions: tuple[VersionInfo, ...]
    example_count: int


class HeadService:
    def __init__(
        self,
        config: ServerConfig,
        embedding: EmbeddingService,
        store: HeadStore,
        cache: EmbeddingCache,
        io_executor: Executor,
        train_executor: Executor,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.embedding = embedding
        self.store = store
        self._bank: HeadBank | None = None
        self.cache = cache
        self.io = io_executor
        self.train_executor = train_executor
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}

    def attach(self, bank: HeadBank) -> None:
        """Called once the backbone is loaded: the bank needs its fingerprint."""
        self._bank = bank

    @property
    def bank(self) -> HeadBank:
        if self._bank is None:
            raise Unavailable("the server is still loading and warming up its backbone; retry shortly")
        return self._bank

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    # -- AdaptHead -------------------------------------------------------------------------------------

    def _check_examples(self, examples: list[Example], config: TrainConfig) -> tuple[list[str], np.ndarray]:
        if not examples:
            raise InvalidArgument("no examples: send labelled examples (the tenant has none stored)")
        if len(examples) > self.config.max_examples:
            raise InvalidArgument(
                f"{len(examples)} examples in all, more than this server's limit of {self.config.max_examples} "
                "per tenant: send fewer, or replace instead of adding"
            )
        for i, e in enumerate(examples):
            if not e.text.strip():
                raise InvalidArgument(f"examples[{i}] has empty text")
            if not e.label.strip():
                raise InvalidArgument(f"examples[{i}] has an empty label")
            if len(e.label) > MAX_LABEL_CHARS:
                raise InvalidArgument(f"examples[{i}] has a label longer than {MAX_LABEL_CHARS} characters")
        labels = sorted({e.label for e in examples})
        if len(labels) < 2:
            raise InvalidArgument(
                f"only one class ({labels[0]!r}): a classifier needs examples of at least two labels"
            )
        if len(labels) > self.config.max_classes:
            raise InvalidArgument(
                f"{len(labels)} labels, more than this server's limit of {self.config.max_classes} per head"
            )
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[e.label] for e in examples], dtype=np.int64)
        need = min_examples_per_class(config.validation_fraction)
        counts = np.bincount(y, minlength=len(labels))
        short = [labels[i] for i in np.flatnonzero(counts < need)]
        if short:
            shown = ", ".join(repr(s) for s in short[:5]) + (" ..." if len(short) > 5 else "")
            raise InvalidArgument(
                f"{len(short)} label(s) have fewer than {need} examples, which a validation fraction of "
                f"{config.validation_fraction} needs (one to train on, one to validate): {shown}; add examples "
                "or train without validation"
            )
        return labels, y

    async def _embed_examples(
        self, tenant: str, texts: list[str], report: Callable[[Progress], None]
    ) -> tuple[np.ndarray, int, int]:
        """Vectors for `texts`, from the cache where possible; returns (vectors, embedded, hits)."""
        fingerprint = self.embedding.backbone.manifest.fingerprint
        keys = [content_key(t) for t in texts]
        found = self.cache.get_many(fingerprint, keys, tenant)
        if len(found) < len(set(keys)):
            stored = await self._io(self.store.cached_embeddings, tenant, fingerprint)
            found.update({k: v for k, v in stored.items() if k not in found})
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found:
                missing[key] = text
        hits = len(texts) - sum(1 for k in keys if k in missing)
        todo = list(missing.items())
        chunk = min(self.config.max_batch_inputs, 256)
        report(Progress("embedding", 0, len(todo)))
        fresh: dict[bytes, np.ndarray] = {}
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            result = await self.embedding.embed([t for _, t in part], what="examples")
            fresh.update({k: result.embeddings[i] for i, (k, _) in enumerate(part)})
            report(Progress("embedding", min(start + chunk, len(todo)), len(todo)))
        self.cache.count(hits, len(todo))
        if self.metrics is not None:
            self.metrics.cache_hits.inc(hits)
            self.metrics.cache_misses.inc(len(todo))
        self.cache.put_many(fingerprint, {**found, **fresh}, tenant)
        found.update(fresh)
        vectors = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
        per_example = dict(zip(keys, vectors, strict=True))
        await self._io(self.store.save_embeddings, tenant, fingerprint, per_example)
        return vectors, len(todo), hits

    async def adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        """Train a new version; yields progress, then the outcome. Cancelling the iteration cancels it."""
        started = time.perf_counter()
        outcome = "failed"
        try:
            async for event in self._adapt(request):
                if isinstance(event, AdaptOutcome):
                    # Counted before the reply leaves: the caller may hang up as soon as it has it.
                    self._count_training("activated" if event.activated else "negative_transfer", started)
                    outcome = ""
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled" if outcome else ""
            raise
        except InvalidArgument:
            outcome = ""  # refused input: no training ran
            raise
        finally:
            if outcome:
                self._count_training(outcome, started)

    def _count_training(self, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.training_runs.labels(outcome).inc()
            self.metrics.training_duration.observe(time.perf_counter() - started)

    async def _adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        tenant = check_tenant(request.tenant)
        backbone = self.embedding.backbone
        bank = self.bank
        lock = self._lock(tenant)
        if lock.locked():
            log.info("AdaptHead for %s waits for the tenant's previous training", tenant)
        async with lock:
            stored = [] if request.replace else await self._io(self.store.examples, tenant)
            examples = [*stored, *request.examples]
            labels, y = self._check_examples(examples, request.config)

            events: asyncio.Queue[Progress] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            vectors_task = asyncio.ensure_future(
                self._embed_examples(tenant, [e.text for e in examples], events.put_nowait)
            )
            try:
                async for event in _drain(events, vectors_task):
                    yield event
                vectors, embedded, hits = vectors_task.result()
            finally:
                vectors_task.cancel()

            stop = threading.Event()

            def on_progress(p: TrainProgress) -> None:
                event = Progress("training", p.epoch, p.max_epochs, p.train_loss, p.val_loss, p.val_accuracy)
                loop.call_soon_threadsafe(events.put_nowait, event)

            def train() -> TrainedHead:
                return train_head(
                    vectors,
                    y,
                    len(labels),
                    request.config,
                    progress=on_progress,
                    should_stop=stop.is_set,
                    label_names=labels,
                )

            training = loop.run_in_executor(self.train_executor, train)
            # A cancelled training ends in TrainingCancelled that nobody awaits; retrieve it so asyncio
            # does not log it as lost.
            training.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                async for event in _drain(events, training):
                    yield event
                head = training.result()
            except TrainingInputError as exc:
                raise InvalidArgument(str(exc)) from exc
            except TrainingDivergedError as exc:
                raise FailedPrecondition(
                    f"training diverged: {exc}; try a larger l2 or a smaller rate"
                ) from exc
            finally:
                # The caller went away (or anything else failed): stop the training thread too.
                stop.set()

            activate = request.force_activate or not head.metrics.negative_transfer
            weights, manifest = head_to_bytes(
                head,
                extra_manifest={
                    "labels": labels,
                    "backbone_fingerprint": backbone.manifest.fingerprint,
                    "created_at": time.time(),
                    "example_count": len(examples),
                    "tenant": tenant,
                },
            )
            state = await self._io(self.store.commit_version, tenant, manifest, weights, examples, activate)
            version = state.versions[-1]
            manifest["version"] = version
            if activate:
                live = await self._io(bank.make_live, tenant, version, manifest, weights)
                bank.swap(live)
            log.info(
                "tenant %s: version %d trained (accuracy %.3f on %s, baseline %.3f)%s",
                tenant,
                version,
                head.metrics.accuracy,
                head.metrics.evaluated_on,
                head.metrics.majority_baseline_accuracy,
                " and activated" if activate else ": negative transfer, not activated",
            )
            yield AdaptOutcome(
                tenant=tenant,
                head=VersionInfo.from_manifest(manifest),
                activated=activate,
                active_version=state.active_version,
                embedded=embedded,
                cache_hits=hits,
            )

    # -- Classify --------------------------------------------------------------------------------------

    async def classify(self, tenant: str, texts: list[str], top: int, version: int) -> Classified:
        check_tenant(tenant)
        check_texts(texts, self.config.max_batch_inputs)
        if top < 0:
            raise InvalidArgument(f"top_k must be 0 (meaning 1) or more, not {top}")
        if version < 0:
            raise InvalidArgument(f"version must be 0 (the active one) or a version number, not {version}")
        # Resident heads are taken on the loop; only a head that must be loaded from the store costs a hop.
        head: LiveHead = self.bank.peek(tenant, version) or await self._io(self.bank.get, tenant, version)
        # The head rides with the texts through the batcher: the backbone and every tenant's head run on
        # the whole mixed batch, and this request keeps `head` (its version) from start to end.
        result = await self.embedding.batcher.submit(texts, slot=head.slot)
        labels = []
        for probs in result.rows:
            indices, scores = top_k(np.asarray(probs)[None, :], max(1, top))
            labels.append(
                [(head.labels[int(i)], float(p)) for i, p in zip(indices[0], scores[0], strict=True)]
            )
        return Classified(
            labels,
            result.truncated,
            head.version,
            Timings(result.queue_s, result.tokenize_s, result.backbone_s, result.head_s),
        )

    # -- management ------------------------------------------------------------------------------------

    async def list_heads(self) -> list[tuple[str, int, int, tuple[str, ...], str]]:
        def work() -> list[tuple[str, int, int, tuple[str, ...], str]]:
            rows = []
            for tenant in self.store.tenants():
                state = self.store.state(tenant)
                shown = state.active_version or state.versions[-1]
                m = self.store.manifest(tenant, shown)
                rows.append(
                    (
                        tenant,
                        state.active_version,
                        len(state.versions),
                        tuple(m["labels"]),
                        m["backbone_fingerprint"],
                    )
                )
            return rows

        result: list[tuple[str, int, int, tuple[str, ...], str]] = await self._io(work)
        return result

    async def get_head(self, tenant: str) -> HeadOverview:
        check_tenant(tenant)

        def work() -> HeadOverview:
            state = self.store.state(tenant)
            versions = tuple(
                VersionInfo.from_manifest(self.store.manifest(tenant, v)) for v in state.versions
            )
            return HeadOverview(tenant, state.active_version, versions, len(self.store.examples(tenant)))

        overview: HeadOverview = await self._io(work)
        return overview

    async def activate(self, tenant: str, version: int) -> tuple[int, int]:
        check_tenant(tenant)
        if version <= 0:
            raise InvalidArgument(f"version must be a positive version number, not {version}")
        async with self._lock(tenant):
            stored = await self._io(self.store.load_version, tenant, version)  # NOT_FOUND if unknown
            live = await self._io(self.bank.make_live, tenant, version, stored.manifest, stored.weights)
            self.bank._check(live)  # FAILED_PRECONDITION before anything moves
            state, previous = await self._io(self.store.activate, tenant, version)
            self.bank.swap(live)
        return state.active_version, previous

    async def delete(self, tenant: str) -> tuple[int, int]:
        check_tenant(tenant)
        async with self._lock(tenant):
            counts: tuple[int, int] = await self._io(self.store.delete, tenant)
            self.bank.evict(tenant)
            self.cache.evict_tenant(tenant)
        return counts


async def _drain(events: asyncio.Queue[Progress], task: asyncio.Future[Any]) -> AsyncIterator[Progress]:
    """Yield queued events until `task` is done, then whatever is left."""
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


__all__ = ["AdaptOutcome", "AdaptRequest", "Classified", "HeadOverview", "HeadService", "Progress"]
