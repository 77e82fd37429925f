"""AdaptHead: embed a tenant's examples (cached), train a head, commit a version, swap it in."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from typing import Any

from headswap.adapters import (
    MAJORITY_BASELINE,
    TrainedHead,
    TrainingCancelled,
    TrainingDivergedError,
    TrainingInputError,
    TrainProgress,
    head_to_bytes,
    train_head,
)
from headswap.server.binding import binding_fields
from headswap.server.cache import EmbeddingCache
from headswap.server.config import LimitsConfig
from headswap.server.domain import AdaptOutcome, AdaptRequest, Example, Progress
from headswap.server.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from headswap.server.manifest import HeadManifest
from headswap.server.metrics import Metrics
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.example_vectors import ExampleVectors
from headswap.server.services.heads import HeadService, version_info
from headswap.server.services.promotion import compare_with_active, trained_on
from headswap.server.services.replay import new_record, replayed, request_digest
from headswap.server.services.training_input import (
    check_examples,
    check_new_examples,
    train_config,
)
from headswap.server.store import (
    AlreadyDone,
    Change,
    HeadStore,
    NewVersion,
    StoredVersion,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TrainingService:
    embedding: EmbeddingService
    heads: HeadService
    cache: EmbeddingCache
    train_executor: Executor  # never the threads that serve
    limits: LimitsConfig
    metrics: Metrics
    device: str = "cpu"  # where heads train

    def __post_init__(self) -> None:
        self.examples = ExampleVectors(self.embedding, self.heads, self.cache, self.limits, self.metrics)

    @property
    def store(self) -> HeadStore:
        return self.heads.store

    async def adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        """Train a new version; yields progress, then the outcome. Cancelling the iteration cancels it."""
        started = time.perf_counter()
        outcome = "failed"
        try:
            async for event in self._adapt(request):
                if isinstance(event, AdaptOutcome):
                    # Counted before the reply leaves: the caller may hang up as soon as it has it.
                    if event.replayed and event.head is not None:
                        self._count("replayed", started)
                    elif event.head is not None:  # a store_only call (or its retry) trained nothing
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

    def _starting_point(self, tenant: str, replace: bool) -> tuple[list[Example], int | None]:
        """The stored examples a training adds to, and the tenant's seq it starts from (0: a new tenant;
        None: a quarantined one, whose commit decides), so that its commit can refuse to land elsewhere."""
        try:
            seq: int | None = self.store.state(tenant).seq
        except NotFound:
            seq = 0
        except DataLoss:
            seq = None
        return ([] if replace else self.store.examples(tenant)), seq

    def _count(self, outcome: str, started: float) -> None:
        self.metrics.training_runs.labels(outcome).inc()
        self.metrics.training_duration.observe(time.perf_counter() - started)

    async def _adapt(self, request: AdaptRequest) -> AsyncIterator[Progress | AdaptOutcome]:
        tenant = request.caller.tenant_for(request.tenant)
        config = train_config(request.options, self.device)
        size = sum(e.input.nbytes + len(e.label.encode()) for e in request.examples)
        if size > self.limits.max_request_bytes:
            raise ResourceExhausted(
                f"the examples carry {size} bytes, more than this server's limit of {self.limits.max_request_bytes} "
                "per call: send them in several AdaptHead calls (new examples are added to the stored ones)"
            )
        digest = request_digest(tenant, request) if request.request_id else ""
        lock = self.heads.locks(tenant)
        if lock.locked():
            log.info("AdaptHead for %s waits for the tenant's previous training", tenant)
        async with lock:
            if request.request_id:  # a retry of a call that was done (here or on another replica)
                done = await self.heads.run_io(self.store.request_record, tenant, request.request_id)
                if done is not None:
                    yield await replayed(self.heads, tenant, request, digest, done)
                    return
            deadline = time.monotonic() + self.limits.max_train_seconds
            stored, expect_seq = await self.heads.run_io(self._starting_point, tenant, request.replace)
            lane = self.embedding.lanes.for_inputs(
                [e.input for e in [*request.examples, *stored]], request.backbone
            )
            # Stored as the backbone sees them: a huge text is kept no larger than what it is embedded from.
            clip = lane.backbone.preprocessor.clip
            new = [Example(clip(e.input), e.label) for e in request.examples]
            check_new_examples(tenant, new, stored, self.limits, lane.kind)
            examples = [*stored, *new]
            if not request.store_only:
                labels, y = check_examples(examples, config, self.limits)

            def name(i: int) -> str:  # an example's place, as the caller knows it
                return f"examples[{i - len(stored)}]" if i >= len(stored) else f"stored example {i}"

            events: asyncio.Queue[Progress] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            embed = new if request.store_only else examples  # store_only: the new ones warm the cache
            vectors_task = asyncio.ensure_future(
                self.examples.vectors(
                    tenant, lane, [e.input for e in embed], events.put_nowait, deadline, name
                )
            )
            try:
                async for event in _drain(events, vectors_task):
                    yield event
                vectors, embedded, hits, to_save = vectors_task.result()
            finally:
                vectors_task.cancel()
            if request.store_only:
                record = new_record(request, digest, False, embedded, hits, len(examples), "", ())
                try:
                    state = await self.heads.run_held(
                        lock, self.store.put_examples, tenant, examples, expect_seq, record
                    )
                except AlreadyDone as already:  # a retry on another replica committed first
                    yield await replayed(self.heads, tenant, request, digest, already.record)
                    return
                await self.examples.save(lock, tenant, lane, to_save)
                log.info(
                    "tenant %s: %d examples stored (%d new), no training", tenant, len(examples), len(new)
                )
                yield AdaptOutcome(
                    tenant, None, False, state.active_version, embedded, hits, stored_examples=len(examples)
                )
                return

            stop = threading.Event()
            out_of_time = False

            def should_stop() -> bool:
                nonlocal out_of_time
                out_of_time = time.monotonic() > deadline
                return stop.is_set() or out_of_time

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
                    should_stop=should_stop,
                    label_names=labels,
                )

            # Work of the lock: a training that goes on after its caller left keeps the tenant locked.
            work = self.train_executor.submit(train)
            lock.hold(work)
            training = asyncio.wrap_future(work)
            # A cancelled training ends in TrainingCancelled that nobody awaits; retrieve it so asyncio
            # does not log it as lost.
            training.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                async for event in _drain(events, training):
                    yield event
                head = training.result()
            except TrainingCancelled:
                if not out_of_time:
                    raise
                raise ResourceExhausted(
                    f"the training ran past this server's budget of {self.limits.max_train_seconds:.0f} s and "
                    "was stopped: use fewer epochs, a smaller hidden_dim or a linear head"
                ) from None
            except TrainingInputError as exc:
                raise InvalidArgument(str(exc)) from exc
            except TrainingDivergedError as exc:
                raise FailedPrecondition(
                    f"training diverged: {exc}; try a larger l2 or a smaller rate"
                ) from exc
            finally:
                # The caller went away (or anything else failed): stop the training thread too.
                stop.set()

            backbone = lane.backbone
            bound = binding_fields(backbone.manifest, backbone.precision)
            bindings = self.heads.bank.bindings
            here = bindings.served[backbone.weights]
            champion = await loop.run_in_executor(
                self.train_executor,
                compare_with_active,
                self.store,
                tenant,
                # The active version is compared on this lane's embeddings wherever this server would serve it
                # in their place: trained on the same weights (in any precision, unless strict).
                lambda active: bindings.serving(bindings.of(active.to_json())) is here,
                head,
                examples,
                vectors,
                y,
            )
            checks = (head.baseline_check,) if champion is None else (head.baseline_check, champion)
            failed = next((c.rule for c in checks if not c.passed), "")
            activate = request.force_activate or not failed
            weights, trained = head_to_bytes(
                head,
                extra_manifest={
                    "labels": labels,
                    **bound,
                    "created_at": time.time(),
                    "example_count": len(examples),
                    "tenant": tenant,
                    "promotion": {"checks": [asdict(c) for c in checks], "forced": request.force_activate},
                },
                weights_metadata=trained_on(examples),
            )
            held_back_by = "" if activate else failed
            record = new_record(
                request, digest, activate, embedded, hits, len(examples), held_back_by, checks
            )
            manifest = HeadManifest.from_json(trained)
            committed = NewVersion(manifest, weights, examples, activate, expect_seq, record)
            try:
                state = await self.heads.run_held(lock, self.store.commit_version, tenant, committed)
            except AlreadyDone as already:  # a retry on another replica committed first
                yield await replayed(self.heads, tenant, request, digest, already.record)
                return
            await self.examples.save(lock, tenant, lane, to_save)
            version = state.versions[-1]
            manifest = replace(manifest, version=version)
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
                head=version_info(manifest, bindings),
                activated=activate,
                active_version=state.active_version,
                embedded=embedded,
                cache_hits=hits,
                stored_examples=len(examples),
                held_back_by=held_back_by,
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
