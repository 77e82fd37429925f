"""Classify and head management: the head bank, the store and the swaps that keep them in step."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple

import numpy as np

from headswap.adapters import metrics_from_manifest, selection_from_manifest, top_k
from headswap.server.binding import UNRECORDED, Bindings
from headswap.server.cache import EmbeddingCache
from headswap.server.domain import (
    Activation,
    Classified,
    ClassifyRequest,
    Deletion,
    HeadOverview,
    HeadSummary,
    ListRequest,
    TenantRequest,
    VersionInfo,
    VersionRequest,
    call_deadline,
)
from headswap.server.errors import DataLoss, InvalidArgument, NotFound
from headswap.server.headbank import HeadBank
from headswap.server.manifest import HeadManifest
from headswap.server.services.embedding import EmbeddingService, timings
from headswap.server.services.locks import TenantLock, TenantLocks
from headswap.server.store import Change, HeadStore, StoredVersion
from headswap.server.store.base import damaged

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def recorded(value: T | None, name: str) -> T:
    """A field of a head manifest that every version records: KeyError (a damaged manifest) when it does not."""
    if value is None:
        raise KeyError(name)
    return value


def version_info(manifest: HeadManifest, bindings: Bindings) -> VersionInfo:
    """A stored version as the API describes it, with the precision this server would answer it in."""
    data = manifest.to_json()
    selection = selection_from_manifest(data)
    binding = bindings.of(data)
    served = bindings.serving(binding)
    return VersionInfo(
        version=recorded(manifest.version, "version"),
        kind=str(recorded(manifest.spec, "spec")["kind"]),
        labels=manifest.labels,
        metrics=metrics_from_manifest(data),
        created_at=float(recorded(manifest.created_at, "created_at")),
        fingerprint=recorded(manifest.backbone_fingerprint, "backbone_fingerprint"),
        example_count=recorded(manifest.example_count, "example_count"),
        l2=selection.l2,
        l2_source=selection.l2_source,
        temperature=selection.temperature,
        trained_precision=binding.precision,
        weights_fingerprint=binding.weights,
        served_precision=served.precision if served is not None else "",
    )


@dataclass(eq=False)
class HeadService:
    embedding: EmbeddingService
    bank: HeadBank
    store: HeadStore
    cache: EmbeddingCache
    locks: TenantLocks
    io: Executor  # store reads and writes, head loading

    async def run_io(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` on the store's threads (blocking I/O never runs on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def run_held(
        self, lock: TenantLock, fn: Callable[[*Ts], T], *args: *Ts, executor: Executor | None = None
    ) -> T:
        """`fn(*args)` on the store's threads (or `executor`'s), as work of the tenant's `lock`: should the
        call go away while it runs, the lock stays held until it ends (services/locks.py)."""
        work = (executor or self.io).submit(fn, *args)
        lock.hold(work)
        return await asyncio.wrap_future(work)

    # -- swaps: every one, local or from the store's feed, takes this path -----------------------------------

    async def apply(self, change: Change, stored: StoredVersion | None = None) -> None:
        await self.run_io(self.bank.reconcile, change, stored)
        if change.deleted:
            self.cache.evict_tenant(change.tenant)

    # -- Classify --------------------------------------------------------------------------------------------

    async def classify(self, request: ClassifyRequest) -> Classified:
        tenant = request.caller.tenant_for(request.tenant)
        self.embedding.check(request.inputs, None)
        if request.top_k < 0:
            raise InvalidArgument(f"top_k must be 0 (meaning 1) or more, not {request.top_k}")
        if request.version < 0:
            raise InvalidArgument(
                f"version must be 0 (the active one) or a version number, not {request.version}"
            )
        if not (math.isfinite(request.min_probability) and 0.0 <= request.min_probability <= 1.0):
            raise InvalidArgument(
                f"min_probability must be between 0 and 1 (0: never abstain), not {request.min_probability}"
            )
        version = request.version
        # Resident heads are taken on the loop; only a head that must be loaded from the store costs a hop.
        head = self.bank.peek(tenant, version)
        if head is None:
            head = await self.run_io(self.bank.get, tenant, version)
        lane = self.embedding.lanes.by_weights(head.weights)
        assert lane is not None, "the bank holds only heads of the backbones served"
        self.embedding.check(
            request.inputs, lane, f"tenant {tenant!r}'s head (trained on backbone {lane.name!r})"
        )
        k = min(max(1, request.top_k), len(head.labels))
        # Sized before any work: every label score costs its label's bytes and a few more on the wire.
        self.embedding.check_reply_size(
            len(request.inputs) * k * (head.max_label_bytes + 12),
            "send fewer inputs per call or ask for a smaller top_k",
        )
        # The head rides with the inputs through the batcher: the backbone and every tenant's head run on
        # the whole mixed batch, and this request keeps `head` (its version) from start to end.
        result = await lane.batcher.submit(
            request.inputs, slot=head.slot, deadline=call_deadline.get(), flow=f"tenant:{tenant}"
        )
        labels, abstained, ood_scores, ood_flags = [], [], [], []
        threshold = head.ood_threshold
        for row in result.rows:
            # The head's probabilities and the input's out-of-distribution score, from one pass.
            probs, ood = np.asarray(row[0]), float(row[1])
            flagged = threshold is not None and math.isfinite(ood) and ood > threshold
            ood_scores.append(ood)
            ood_flags.append(flagged)
            if (
                k == 1
            ):  # the usual reply: the best label alone (argmax keeps the lowest index on ties, as top_k)
                best = int(np.argmax(probs))
                labels.append([(head.labels[best], float(probs[best]))])
                top = float(probs[best])
            else:
                indices, scores = top_k(probs, k)
                labels.append([(head.labels[int(i)], float(p)) for i, p in zip(indices, scores, strict=True)])
                top = float(scores[0])
            # The head's probabilities are calibrated (its temperature is folded into its weights), so the
            # threshold means what it says: predictions kept at 0.9 are right at least about 9 times in 10 on
            # inputs like its examples; an input like none of them is abstained unless the caller says not to.
            abstained.append(top < request.min_probability or (flagged and not request.ignore_ood))
        t = timings(result)
        metrics = self.embedding.metrics
        metrics.observe_stages(t.queue_s, t.preprocess_s, t.backbone_s, t.head_s)
        served = lane.backbone.precision
        trained = head.binding.precision
        if self.bank.bindings.is_cross(head.binding, self.bank.bindings.served[head.weights]):
            metrics.cross_precision.labels(trained or UNRECORDED, served).inc(len(request.inputs))
        return Classified(
            labels,
            result.truncated,
            head.version,
            t,
            lane.describe(),
            abstained,
            trained,
            ood_scores,
            ood_flags,
        )

    # -- management ------------------------------------------------------------------------------------------

    async def list_heads(self, request: ListRequest) -> list[HeadSummary]:
        def summary(tenant: str) -> HeadSummary | None:
            try:
                state = self.store.state(tenant)
                shown = state.active_version or (state.versions[-1] if state.versions else 0)
                if not shown:
                    return HeadSummary(tenant, 0, 0, (), "")
                m = self.store.manifest(tenant, shown)
                return HeadSummary(
                    tenant,
                    state.active_version,
                    len(state.versions),
                    m.labels,
                    m.backbone_fingerprint or "",
                )
            except NotFound:
                return None  # deleted while listing
            except DataLoss:
                return HeadSummary(tenant, 0, 0, (), "", problem=self.store.damaged.get(tenant, "damaged"))

        def work() -> list[HeadSummary]:
            # A tenant key sees its own tenant only (whether or not others exist is not its business).
            mine = request.caller.tenant
            tenants = self.store.tenants() if mine is None else [mine]
            return [row for tenant in tenants if (row := summary(tenant)) is not None]

        return await self.run_io(work)

    async def get_head(self, request: TenantRequest) -> HeadOverview:
        tenant = request.caller.tenant_for(request.tenant)

        def work() -> HeadOverview:
            state = self.store.state(tenant)
            bindings = self.bank.bindings
            versions = tuple(self._version_info(tenant, v, bindings) for v in state.versions)
            return HeadOverview(tenant, state.active_version, versions, len(self.store.examples(tenant)))

        return await self.run_io(work)

    def _version_info(self, tenant: str, version: int, bindings: Bindings) -> VersionInfo:
        manifest = self.store.manifest(tenant, version)
        try:
            return version_info(manifest, bindings)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A manifest written before its seal, with a field missing or of a type no check caught.
            problem = f"version {version}'s head.json cannot be read ({type(exc).__name__}: {exc})"
            self.store.damaged[tenant] = problem
            raise damaged(tenant, problem) from None

    async def activate(self, request: VersionRequest) -> Activation:
        tenant, version = request.caller.tenant_for(request.tenant), request.version
        if version <= 0:
            raise InvalidArgument(f"version must be a positive version number, not {version}")
        async with (lock := self.locks(tenant)):
            stored = await self.run_io(self.store.load_version, tenant, version)  # NOT_FOUND if unknown
            self.bank.check(
                await self.run_io(self.bank.load, tenant, version, stored)
            )  # before anything moves
            state, previous = await self.run_held(lock, self.store.activate, tenant, version)
            await self.apply(Change(tenant, state.active_version, state.seq), stored)
        return Activation(tenant, state.active_version, previous)

    async def delete_version(self, request: VersionRequest) -> HeadOverview:
        tenant, version = request.caller.tenant_for(request.tenant), request.version
        if version <= 0:
            raise InvalidArgument(f"version must be a positive version number, not {version}")
        async with (lock := self.locks(tenant)):
            # NOT_FOUND, FAILED_PRECONDITION
            await self.run_held(lock, self.store.delete_version, tenant, version)
            self.bank.forget_version(tenant, version)
        return await self.get_head(TenantRequest(tenant, request.caller))

    async def delete(self, request: TenantRequest) -> Deletion:
        tenant = request.caller.tenant_for(request.tenant)
        async with (lock := self.locks(tenant)):
            deletion, change = await self.run_held(lock, self.store.delete, tenant)  # NOT_FOUND if unknown
            await self.apply(change)
        return deletion
