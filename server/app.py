"""The server process: `build(config)` makes every part up front; `Server` starts, serves and drains.

Start-up order: build (load the backbone and warm PyTorch up), listen with health NOT_SERVING, warm the
backbone up through the batcher (the very path calls take), follow the store's change feed, then SERVING.
On SIGTERM: NOT_SERVING, refuse new calls, let calls in flight finish within the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from headswap.server import loops, scheduling, workers
from headswap.server.backbones import load_backbones, name_lanes
from headswap.server.binding import Bindings, ServedBackbone
from headswap.server.cache import EmbeddingCache
from headswap.server.config import ServerConfig
from headswap.server.errors import HeadswapError
from headswap.server.headbank import HeadBank, ScoredHeads
from headswap.server.inference.batcher import Batcher
from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.lanes import Lane, Lanes
from headswap.server.inference.protocols import Backbone
from headswap.server.input_kinds import input_kind
from headswap.server.metrics import Metrics
from headswap.server.pools import Pools, limit_blas_threads
from headswap.server.rpc.interceptors import CallInterceptor
from headswap.server.rpc.overload import LoopLag
from headswap.server.rpc.server import SERVICE_NAME, GrpcServer
from headswap.server.rpc.servicer import HeadswapServicer
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.heads import HeadService
from headswap.server.services.keys import KeyService
from headswap.server.services.locks import TenantLocks
from headswap.server.services.training import TrainingService
from headswap.server.store import HeadStore, open_store
from headswap.server.store.local import LocalStore
from headswap.server.tasks import cancel

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


@dataclass(eq=False)
class Server:
    config: ServerConfig
    lanes: Lanes
    store: HeadStore
    metrics: Metrics
    pools: Pools
    bank: HeadBank
    heads: HeadService
    keys: KeyService
    rpc: GrpcServer
    port: int = 0  # set by start()
    metrics_port: int = 0
    _follow: asyncio.Task[None] | None = field(default=None, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def backbone(self) -> Backbone:
        """The first backbone served (the only one, unless several are configured)."""
        return self.lanes.default.backbone

    @property
    def batcher(self) -> Batcher:
        return self.lanes.default.batcher

    async def start(self) -> int:
        """Listen at once (health says NOT_SERVING), warm up, then SERVING. Returns the gRPC port."""
        self.port = await self.rpc.start()
        log.info("gRPC listening on port %d; warming up", self.port)
        if self.config.metrics_port and workers.worker_index() is not None:
            # One of several workers: metrics on a loopback port, merged by the supervisor's --metrics-port.
            self.metrics_port = self.metrics.serve(0, "127.0.0.1")
            workers.report_metrics_port(self.metrics_port)
        elif self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        for lane in self.lanes:
            lane.batcher.start()
        if self.rpc.interceptor.lag is not None:
            self.rpc.interceptor.lag.start()
        started = time.perf_counter()
        for lane in self.lanes:
            await self._warm_up(lane)
        warm_s = time.perf_counter() - started
        self._follow = asyncio.get_running_loop().create_task(self._follow_store(), name="headswap-follow")
        await self.rpc.serving()
        served = ", ".join(
            f"{lane.name} on {lane.backbone.encoder.provider} in {lane.backbone.encoder.precision}"
            for lane in self.lanes
        )
        log.info(
            "SERVING on port %d (backbones: %s; warmed up in %.1fs; event loop: %s; cpu policy: %s)",
            self.port,
            served,
            warm_s,
            loops.running_name(),
            scheduling.current(),
        )
        return self.port

    async def _warm_up(self, lane: Lane) -> None:
        """Run the batch shapes serving sees first through the batcher, so no caller pays for kernel set-up:
        every shape bucket (when on), then the warm-up batches through the very path calls take."""
        started = time.perf_counter()
        shapes = await lane.batcher.warm_up_buckets()
        if shapes:
            log.info(
                "backbone %s: %d shape buckets warmed up in %.2fs",
                lane.name,
                shapes,
                time.perf_counter() - started,
            )
        items = lane.batcher.policy.max_batch_items
        for _ in range(self.config.warmup_rounds):
            for inputs in lane.backbone.preprocessor.warm_up_batches(items):
                await lane.batcher.submit(inputs)
        log.debug("backbone %s warm-up done in %.2fs", lane.name, time.perf_counter() - started)

    async def _follow_store(self) -> None:
        """Apply every change the store publishes (here or, with a shared store, on another replica)."""
        async for change in self.store.changes():
            try:
                if change.key_id:
                    self.keys.forget(change.key_id)
                else:
                    await self.heads.apply(change)
            except Exception:
                log.exception("could not apply a change of the store (seq %d)", change.seq)

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        log.info("draining: up to %.0fs for calls in flight", self.config.grace_seconds)
        await self.rpc.stop(self.config.grace_seconds)
        await cancel(self._follow)
        for lane in self.lanes:
            await lane.batcher.stop()
        if self.rpc.interceptor.lag is not None:
            await self.rpc.interceptor.lag.stop()
        self.pools.shutdown()
        self.metrics.close()
        self.store.close()
        log.info("stopped")

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain; 0 on a clean stop, 1 when start-up failed."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except Exception:
            log.exception("start-up failed")
            await self.rpc.stop(0)
            self.pools.shutdown()
            return 1
        await self._stop.wait()
        await self.stop()
        return 0


def build(
    config: ServerConfig,
    *,
    backbone: Backbone | Sequence[tuple[str, Backbone]] | None = None,
    store: HeadStore | None = None,
) -> Server:
    """Every part of a server, ready to start. `backbone` (one, or (name, backbone) pairs) and `store` replace
    the configured ones (tests)."""
    import torch

    from headswap.adapters.grouped import HeadStack

    if backbone is None:
        loaded = load_backbones(config)
    elif isinstance(backbone, Backbone):
        loaded = [("", backbone)]
    else:
        loaded = list(backbone)
    named = name_lanes(loaded)
    if store is None:
        store = open_store(
            config.store_url,
            max_versions=config.limits.max_versions,
            migrate=config.store.migrate,
            shared=config.workers > 1,
        )
    torch.set_num_threads(config.train_threads)
    limit_blas_threads()
    if config.warmup_rounds:
        for dim in sorted({b.dim for _, b in named}):
            _warm_up_training(dim)
    # Trainings run on the GPU when there is one; serving applies heads on the CPU whatever the backbone
    # runs on: the embeddings are on the host already, and on an H200 the head stage of a small batch took
    # 0.5 ms (one worker) to 3.4 ms (eight, sharing the GPU) against 0.04 ms for a row on a CPU core
    # (docs/BENCHMARKS.md, "GPU serving").
    train_device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    head_device = "cpu"
    where = config.store.redacted if config.store.url else config.store_url
    log.info("store at %s: %d tenants; heads trained on %s", where, len(store.tenants()), train_device)

    metrics = Metrics()
    pools = Pools(
        preprocess=ThreadPoolExecutor(config.worker_threads, thread_name_prefix="headswap-preprocess"),
        io=ThreadPoolExecutor(2, thread_name_prefix="headswap-io"),
        train=ThreadPoolExecutor(config.limits.train_workers, thread_name_prefix="headswap-train"),
    )
    lanes = []
    for name, served in named:
        stack = HeadStack(served.dim, device=head_device)
        policy = config.batching.policy(served.on_gpu)
        text = input_kind(served.manifest.input_kind).length_axis  # padded along a length: tokens
        buckets = (
            ShapeBuckets.for_backbone(policy.max_batch_items, served.manifest.max_length if text else None)
            if config.batching.buckets_on(served.on_gpu)
            else None
        )
        log.info(
            "%s: batches of at most %d inputs and a cost of %d%s%s",
            name, policy.max_batch_items, policy.max_batch_cost,
            f", padding at most {100 * policy.max_padding:.0f}%" if text else "",
            f", padded to {len(buckets.shapes())} shape buckets" if buckets else "",
        )  # fmt: skip
        batcher = Batcher(
            served,
            policy,
            pools.preprocess,
            pools.backbone(name),
            ScoredHeads(stack),
            metrics.observe_batch,
            buckets=buckets,
            prepare_workers=config.worker_threads,
        )
        lanes.append(Lane(name, served, batcher, stack))
    served_lanes = Lanes(tuple(lanes))
    bindings = Bindings(
        (
            ServedBackbone.of(lane.backbone.manifest, lane.backbone.precision, lane.name)
            for lane in served_lanes
        ),
        strict=config.strict_precision,
    )
    bank = HeadBank(
        store,
        {lane.backbone.weights: lane.stack for lane in served_lanes},
        config.limits.max_resident_head_bytes,
        bindings=bindings,
    )
    cache = EmbeddingCache(config.store.cache_capacity, config.store.cache_scope)
    embedding = EmbeddingService(served_lanes, config.limits, metrics)
    # A local store shared by several workers locks tenants across processes too (services/locks.py).
    lock_dir = store.root / "locks" if isinstance(store, LocalStore) and store.shared else None
    heads = HeadService(embedding, bank, store, cache, TenantLocks(lock_dir), pools.io)
    training = TrainingService(
        embedding, heads, cache, pools.train, config.limits, metrics, device=train_device
    )
    keys = KeyService(store, config.auth.load_pepper(), pools.io, metrics)
    if not keys.enabled and config.host not in LOOPBACK:
        log.warning(
            "--auth none on %s: anyone who reaches this port can read, retrain and delete every tenant's heads; "
            "use --auth keys (README: API keys) unless a proxy in front authenticates callers",
            config.host,
        )
    servicer = HeadswapServicer(embedding, heads, training, keys)
    lag = LoopLag(config.batching.max_loop_lag_ms / 1000.0) if config.batching.max_loop_lag_ms else None
    interceptor = CallInterceptor(metrics, keys.authenticate if keys.enabled else None, lag=lag)
    rpc = GrpcServer(
        config.host,
        config.port,
        config.limits.max_message_bytes,
        servicer,
        interceptor,
        config.tls,
        config.health_port,
    )
    server = Server(config, served_lanes, store, metrics, pools, bank, heads, keys, rpc)
    _watch(server)
    return server


def _watch(server: Server) -> None:
    m, bank, store = server.metrics, server.bank, server.store
    for lane in server.lanes:
        b = lane.backbone
        m.backbone_info.labels(
            lane.name, b.manifest.name, b.fingerprint, b.encoder.provider, b.encoder.precision
        ).set(1)
    m.watch(m.queue_depth, lambda: sum(lane.batcher.queue_depth for lane in server.lanes))
    lag = server.rpc.interceptor.lag
    if lag is not None:
        m.watch(m.loop_lag, lambda: lag.lag_s)
    m.watch(m.heads_resident, lambda: bank.resident()[0])
    m.watch(m.heads_resident_bytes, lambda: bank.resident()[1])
    m.watch(m.heads_allocated_bytes, bank.allocated_bytes)
    m.watch(m.cache_entries, lambda: len(server.heads.cache))
    m.watch(m.tenants, lambda: len(store.tenants()))
    m.watch(m.tenants_quarantined, lambda: len(store.damaged))
    bank.on_swap = m.swaps.inc


def _warm_up_training(dim: int) -> None:
    """PyTorch's first training in a process pays ~0.7 s of one-off set-up; pay it before SERVING."""
    import numpy as np

    from headswap.adapters import HEAD_KINDS, TrainConfig, train_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, dim)).astype(np.float32)
    y = np.arange(16, dtype=np.int64) % 2
    for kind in HEAD_KINDS:
        train_head(x, y, 2, TrainConfig(kind=kind, max_epochs=2, device="cpu"))


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM: this process alone, or (`--workers` > 1) as the supervisor of several."""
    if not scheduling.applied(config.cpu_policy):  # before the workers and threads, which inherit it
        return 1
    if workers.worker_index() is None:
        count = workers.auto_workers(config)
        if count > 1:
            return workers.run_supervisor(replace(config, workers=count), count)
        config = replace(config, workers=1)
    else:
        config = workers.as_worker(config)

    async def main() -> int:
        try:
            server = build(config)
        except (HeadswapError, OSError, RuntimeError, ValueError) as exc:  # bad setting, store unreachable
            log.error("start-up failed: %s", exc.message if isinstance(exc, HeadswapError) else exc)
            return 1
        return await server.run()

    return loops.run(main(), config.event_loop)


__all__ = ["SERVICE_NAME", "Server", "build", "serve"]
