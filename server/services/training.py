"""AdaptHead: embed a tenant's examples (cached), train a head, commit a version, swap it in."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

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
from headswap.server.services.locks import TenantLock
from headswap.server.services.promotion import compare_with_active, trained_on
from headswap.server.services.replay import new_record, replayed, request_digest
from headswap.server.services.training_input import (
    check_examples,
    check_new_examples,
    train_config,
)
from headswap.server.services.training_run import TrainingRun, drain
from headswap.server.store import (
    AlreadyDone,
    Change,
    HeadStore,
    NewVersion,
    StoredVersion,
)

if TYPE_CHECKING:
    from headswap.adapters import GateCheck, TrainConfig

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
        """The steps of a training, each named below: they run with the tenant's lock held."""
        tenant = request.caller.tenant_for(request.tenant)
        config = train_config(request.options, self.device)
        self._check_size(request)
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
            run = await self._gather(tenant, request, config, digest, lock)
            async with aclosing(self._embed(run)) as embedding:
                async for event in embedding:
                    yield event
            if request.store_only:
                yield await self._store_examples(run)
                return
            async with aclosing(self._train(run)) as training:
                async for event in training:
                    yield event
            yield await self._commit(run)

    def _check_size(self, request: AdaptRequest) -> None:
        size = sum(e.input.nbytes + len(e.label.encode()) for e in request.examples)
        if size > self.limits.max_request_bytes:
            raise ResourceExhausted(
                f"the examples carry {size} bytes, more than this server's limit of {self.limits.max_request_bytes} "
                "per call: send them in several AdaptHead calls (new examples are added to the stored ones)"
            )

    async def _gather(
        self, tenant: str, request: AdaptRequest, config: TrainConfig, digest: str, lock: TenantLock
    ) -> TrainingRun:
        """The examples to train on (the stored ones and the new), checked, and the lane that embeds them."""
        deadline = time.monotonic() + self.limits.max_train_seconds
        stored, expect_seq = await self.heads.run_io(self._starting_point, tenant, request.replace)
        lane = self.embedding.lanes.for_inputs(
            [e.input for e in [*request.examples, *stored]], request.backbone
        )
        # Stored as the backbone sees them: a huge text is kept no larger than what it is embedded from.
        clip = lane.backbone.preprocessor.clip
        new = [Example(clip(e.input), e.label) for e in request.examples]
        check_new_examples(tenant, new, stored, self.limits, lane.kind)
        run = TrainingRun(tenant, request, config, digest, lock, deadline, lane, stored, new, expect_seq)
        if not request.store_only:
            run.labels, run.y = check_examples(run.examples, config, self.limits)
        return run

    async def _embed(self, run: TrainingRun) -> AsyncGenerator[Progress, None]:
        """The examples' vectors (cache-through), with their progress; store_only: the new ones warm the cache."""
        embed = run.new if run.request.store_only else run.examples
        vectors_task = asyncio.ensure_future(
            self.examples.vectors(
                run.tenant, run.lane, [e.input for e in embed], run.events.put_nowait, run.deadline, run.name
            )
        )
        try:
            async for event in drain(run.events, vectors_task):
                yield event
            run.vectors, run.embedded, run.hits, run.to_save = vectors_task.result()
        finally:
            vectors_task.cancel()

    async def _store_examples(self, run: TrainingRun) -> AdaptOutcome:
        """A store_only call: keep the examples, train nothing."""
        tenant, examples = run.tenant, run.examples
        record = new_record(run.request, run.digest, False, run.embedded, run.hits, len(examples), "", ())
        try:
            state = await self.heads.run_held(
                run.lock, self.store.put_examples, tenant, examples, run.expect_seq, record
            )
        except AlreadyDone as already:  # a retry on another replica committed first
            return await replayed(self.heads, tenant, run.request, run.digest, already.record)
        await self.examples.save(run.lock, tenant, run.lane, run.to_save)
        log.info("tenant %s: %d examples stored (%d new), no training", tenant, len(examples), len(run.new))
        return AdaptOutcome(
            tenant, None, False, state.active_version, run.embedded, run.hits, stored_examples=len(examples)
        )

    async def _train(self, run: TrainingRun) -> AsyncGenerator[Progress, None]:
        """Train the head on the train executor, with its progress; stopped when the caller leaves or the
        budget runs out."""
        stop = threading.Event()
        out_of_time = False
        loop = asyncio.get_running_loop()
        deadline, events = run.deadline, run.events

        def should_stop() -> bool:
            nonlocal out_of_time
            out_of_time = time.monotonic() > deadline
            return stop.is_set() or out_of_time

        def on_progress(p: TrainProgress) -> None:
            event = Progress("training", p.step, p.steps, p.train_loss, p.val_loss, p.val_accuracy)
            loop.call_soon_threadsafe(events.put_nowait, event)

        def train() -> TrainedHead:
            return train_head(
                run.vectors,
                run.y,
                len(run.labels),
                run.config,
                progress=on_progress,
                should_stop=should_stop,
                label_names=run.labels,
            )

        # Work of the lock: a training that goes on after its caller left keeps the tenant locked.
        work = self.train_executor.submit(train)
        run.lock.hold(work)
        training = asyncio.wrap_future(work)
        # A cancelled training ends in TrainingCancelled that nobody awaits; retrieve it so asyncio
        # does not log it as lost.
        training.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async for event in drain(events, training):
                yield event
            run.head = training.result()
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
            raise FailedPrecondition(f"training diverged: {exc}; try a larger l2 or a smaller rate") from exc
        finally:
            # The caller went away (or anything else failed): stop the training thread too.
            stop.set()

    async def _gate(self, run: TrainingRun, head: TrainedHead) -> tuple[GateCheck, ...]:
        """The promotion checks: the majority baseline, and the active version where there is one."""
        bindings = self.heads.bank.bindings
        here = bindings.served[run.lane.backbone.weights]
        champion = await asyncio.get_running_loop().run_in_executor(
            self.train_executor,
            compare_with_active,
            self.store,
            run.tenant,
            # The active version is compared on this lane's embeddings wherever this server would serve it
            # in their place: trained on the same weights (in any precision, unless strict).
            lambda active: bindings.serving(bindings.of(active.to_json())) is here,
            head,
            run.examples,
            run.vectors,
            run.y,
        )
        return (head.baseline_check,) if champion is None else (head.baseline_check, champion)

    async def _commit(self, run: TrainingRun) -> AdaptOutcome:
        """Gate the trained head, commit it as a new version, swap it in if it passed (or is forced)."""
        tenant, request, examples, head = run.tenant, run.request, run.examples, run.head
        backbone = run.lane.backbone
        bound = binding_fields(backbone.manifest, backbone.precision)
        checks = await self._gate(run, head)
        failed = next((c.rule for c in checks if not c.passed), "")
        activate = request.force_activate or not failed
        weights, trained = head_to_bytes(
            head,
            extra_manifest={
                "labels": run.labels,
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
            request, run.digest, activate, run.embedded, run.hits, len(examples), held_back_by, checks
        )
        manifest = HeadManifest.from_json(trained)
        committed = NewVersion(manifest, weights, examples, activate, run.expect_seq, record)
        try:
            state = await self.heads.run_held(run.lock, self.store.commit_version, tenant, committed)
        except AlreadyDone as already:  # a retry on another replica committed first
            return await replayed(self.heads, tenant, request, run.digest, already.record)
        await self.examples.save(run.lock, tenant, run.lane, run.to_save)
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
        return AdaptOutcome(
            tenant=tenant,
            head=version_info(manifest, self.heads.bank.bindings),
            activated=activate,
            active_version=state.active_version,
            embedded=run.embedded,
            cache_hits=run.hits,
            stored_examples=len(examples),
            held_back_by=held_back_by,
            checks=checks,
        )
