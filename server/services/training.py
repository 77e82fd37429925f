"""AdaptHead: embed a tenant's examples (cached), train a head, commit a version, swap it in."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from headswap.adapters import (
    MAJORITY_BASELINE,
    TrainConfig,
    TrainedHead,
    TrainingDivergedError,
    TrainingInputError,
    TrainProgress,
    head_to_bytes,
    min_examples_per_class,
    train_head,
)
from headswap.server.cache import EmbeddingCache
from headswap.server.config import LimitsConfig
from headswap.server.domain import AdaptOutcome, AdaptRequest, Example, Input, Progress, TrainingOptions
from headswap.server.errors import FailedPrecondition, InvalidArgument
from headswap.server.metrics import Metrics
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.heads import HeadService, version_info
from headswap.server.services.promotion import compare_with_active, trained_on
from headswap.server.store import Change, HeadStore, NewVersion, StoredVersion
from headswap.server.validation import check_kind, check_tenant

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 200
MAX_EPOCHS = 10_000
MAX_HIDDEN_DIM = 8192
EMBED_CHUNK = 256


def train_config(options: TrainingOptions, device: str) -> TrainConfig:
    """Zero values mean the defaults; anything out of range is INVALID_ARGUMENT with the reason.

    The defaults leave `validation_fraction` and `l2` unset: cross-validated (or, for large sets, held-out)
    model selection and calibration, then a refit on every example.
    """
    defaults = TrainConfig()
    # Bounds that keep one training from taking the server's memory or hours of its time.
    if not 0 <= options.max_epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"max_epochs must be between 1 and {MAX_EPOCHS}, not {options.max_epochs}")
    if not 0 <= options.hidden_dim <= MAX_HIDDEN_DIM:
        raise InvalidArgument(f"hidden_dim must be between 1 and {MAX_HIDDEN_DIM}, not {options.hidden_dim}")
    if options.no_validation and options.validation_fraction:
        raise InvalidArgument("set validation_fraction or no_validation, not both")
    fraction = 0.0 if options.no_validation else (options.validation_fraction or None)
    try:
        return TrainConfig(
            kind=options.kind,
            validation_fraction=fraction,
            seed=int(options.seed),
            l2=options.l2 or None,
            max_epochs=options.max_epochs or defaults.max_epochs,
            hidden_dim=options.hidden_dim or defaults.hidden_dim,
            dropout=options.dropout or defaults.dropout,
            device=device,
        )
    except ValueError as exc:
        raise InvalidArgument(f"bad training options: {exc}") from None


@dataclass(eq=False)
class TrainingService:
    embedding: EmbeddingService
    heads: HeadService
    cache: EmbeddingCache
    train_executor: Executor  # never the threads that serve
    limits: LimitsConfig
    metrics: Metrics
    device: str = "cpu"  # where heads train

    @property
    def store(self) -> HeadStore:
        return self.heads.store

    def _check_examples(self, examples: list[Example], config: TrainConfig) -> tuple[list[str], np.ndarray]:
        if not examples:
            raise InvalidArgument("no examples: send labelled examples (the tenant has none stored)")
        if len(examples) > self.limits.max_examples:
            raise InvalidArgument(
                f"{len(examples)} examples in all, more than this server's limit of {self.limits.max_examples} "
                "per tenant: send fewer, or replace instead of adding"
            )
        kind = self.embedding.backbone.manifest.input_kind
        for i, e in enumerate(examples):
            check_kind(e.input, kind, f"examples[{i}]")
            if e.input.text is not None and not e.input.text.strip():
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
        if len(labels) > self.limits.max_classes:
            raise InvalidArgument(
                f"{len(labels)} labels, more than this server's limit of {self.limits.max_classes} per head"
            )
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[e.label] for e in examples], dtype=np.int64)
        need = min_examples_per_class(config.validation_fraction)
        counts = np.bincount(y, minlength=len(labels))
        short = [labels[i] for i in np.flatnonzero(counts < need)]
        if short:
            shown = ", ".join(repr(s) for s in short[:5]) + (" ..." if len(short) > 5 else "")
            raise InvalidArgument(
                f"{len(short)} label(s) have fewer than {need} examples, which validation needs (one to train "
                f"on, one to hold out for choosing settings and checking the head): {shown}; add examples, "
                "or train without validation (no_validation)"
            )
        return labels, y

    async def _embed_examples(
        self, tenant: str, inputs: list[Input], report: Callable[[Progress], None]
    ) -> tuple[np.ndarray, int, int]:
        """Vectors for `inputs`, from the cache where possible; returns (vectors, embedded, hits)."""
        fingerprint = self.embedding.backbone.fingerprint
        keys = [item.content_key() for item in inputs]
        found = self.cache.get_many(fingerprint, keys, tenant)
        if len(found) < len(set(keys)):
            stored = await self.heads.run_io(self.store.cached_embeddings, tenant, fingerprint)
            found.update({k: v for k, v in stored.items() if k not in found})
        missing: dict[bytes, Input] = {}
        for key, item in zip(keys, inputs, strict=True):
            if key not in found:
                missing[key] = item
        hits = len(inputs) - sum(1 for k in keys if k in missing)
        todo = list(missing.items())
        chunk = min(self.limits.max_batch_inputs, EMBED_CHUNK)
        report(Progress("embedding", 0, len(todo)))
        fresh: dict[bytes, np.ndarray] = {}
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            vectors = await self.embedding.vectors([item for _, item in part])
            fresh.update({k: vectors[i] for i, (k, _) in enumerate(part)})
            report(Progress("embedding", min(start + chunk, len(todo)), len(todo)))
        self.cache.count(hits, len(todo))
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(todo))
        self.cache.put_many(fingerprint, {**found, **fresh}, tenant)
        found.update(fresh)
        vectors = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
        per_example = dict(zip(keys, vectors, strict=True))
        await self.heads.run_io(self.store.save_embeddings, tenant, fingerprint, per_example)
        return vectors, len(todo), hits

    async def adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        """Train a new version; yields progress, then the outcome. Cancelling the iteration cancels it."""
        started = time.perf_counter()
        outcome = "failed"
        try:
            async for event in self._adapt(request):
                if isinstance(event, AdaptOutcome):
                    # Counted before the reply leaves: the caller may hang up as soon as it has it.
                    held_back = "worse_than_active" if event.held_back_by else ""
                    if event.held_back_by == MAJORITY_BASELINE:
                        held_back = "negative_transfer"
                    self._count(held_back or "activated", started)
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
                self._count(outcome, started)

    def _count(self, outcome: str, started: float) -> None:
        self.metrics.training_runs.labels(outcome).inc()
        self.metrics.training_duration.observe(time.perf_counter() - started)

    async def _adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        tenant = check_tenant(request.tenant)
        config = train_config(request.options, self.device)
        lock = self.heads.locks(tenant)
        if lock.locked():
            log.info("AdaptHead for %s waits for the tenant's previous training", tenant)
        async with lock:
            stored = [] if request.replace else await self.heads.run_io(self.store.examples, tenant)
            examples = [*stored, *request.examples]
            labels, y = self._check_examples(examples, config)

            events: asyncio.Queue[Progress] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            vectors_task = asyncio.ensure_future(
                self._embed_examples(tenant, [e.input for e in examples], events.put_nowait)
            )
            try:
                async for event in _drain(events, vectors_task):
                    yield event
                vectors, embedded, hits = vectors_task.result()
            finally:
                vectors_task.cancel()

            stop = threading.Event()

            def on_progress(p: TrainProgress) -> None:
                event = Progress("training", p.step, p.steps, p.train_loss, p.val_loss, p.val_accuracy)
                loop.call_soon_threadsafe(events.put_nowait, event)

            def train() -> TrainedHead:
                return train_head(
                    vectors,
                    y,
                    len(labels),
                    config,
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

            fingerprint = self.embedding.backbone.fingerprint
            champion = await loop.run_in_executor(
                self.train_executor,
                compare_with_active,
                self.store,
                tenant,
                fingerprint,
                head,
                examples,
                vectors,
                y,
            )
            checks = (head.baseline_check,) if champion is None else (head.baseline_check, champion)
            failed = next((c.rule for c in checks if not c.passed), "")
            activate = request.force_activate or not failed
            weights, manifest = head_to_bytes(
                head,
                extra_manifest={
                    "labels": labels,
                    "backbone_fingerprint": fingerprint,
                    "created_at": time.time(),
                    "example_count": len(examples),
                    "tenant": tenant,
                    "promotion": {"checks": [asdict(c) for c in checks], "forced": request.force_activate},
                },
                weights_metadata=trained_on(examples),
            )
            new = NewVersion(manifest, weights, examples, activate)
            state = await self.heads.run_io(self.store.commit_version, tenant, new)
            version = state.versions[-1]
            manifest["version"] = version
            if activate:
                await self.heads.apply(
                    Change(tenant, state.active_version, state.seq), StoredVersion(version, manifest, weights)
                )
            log.info(
                "tenant %s: version %d trained (accuracy %.3f on %s, baseline %.3f, l2 %g, temperature %.3g)%s",
                tenant,
                version,
                head.metrics.accuracy,
                head.metrics.evaluated_on,
                head.metrics.majority_baseline_accuracy,
                head.selection.l2,
                head.selection.temperature,
                " and activated" if activate else f": held back by {failed}, not activated",
            )
            yield AdaptOutcome(
                tenant=tenant,
                head=version_info(manifest),
                activated=activate,
                active_version=state.active_version,
                embedded=embedded,
                cache_hits=hits,
                held_back_by="" if activate else failed,
                checks=checks,
            )


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
