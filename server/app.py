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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from headswap.server.cache import EmbeddingCache
from headswap.server.config import ServerConfig
from headswap.server.headbank import HeadBank
from headswap.server.inference.batcher import Batcher, BatchPolicy
from headswap.server.inference.protocols import Backbone
from headswap.server.metrics import Metrics
from headswap.server.rpc.interceptors import CallInterceptor
from headswap.server.rpc.server import SERVICE_NAME, GrpcServer
from headswap.server.rpc.servicer import HeadswapServicer
from headswap.server.services.embedding import EmbeddingService
from headswap.server.services.heads import HeadService
from headswap.server.services.locks import TenantLocks
from headswap.server.services.training import TrainingService
from headswap.server.store import HeadStore, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pools:
    """Blocking work never runs on the event loop: each kind has its own threads."""

    preprocess: ThreadPoolExecutor  # tokenizing, image decoding
    backbone: ThreadPoolExecutor  # one thread: the encoder runs one batch at a time
    io: ThreadPoolExecutor  # store reads and writes, head loading
    train: ThreadPoolExecutor  # head training, never on the threads that serve

    def shutdown(self) -> None:
        for pool in (self.preprocess, self.backbone, self.io, self.train):
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class Server:
    config: ServerConfig
    backbone: Backbone
    store: HeadStore
    metrics: Metrics
    pools: Pools
    batcher: Batcher
    bank: HeadBank
    heads: HeadService
    rpc: GrpcServer
    port: int = 0  # set by start()
    metrics_port: int = 0
    _follow: asyncio.Task[None] | None = field(default=None, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def start(self) -> int:
        """Listen at once (health says NOT_SERVING), warm up, then SERVING. Returns the gRPC port."""
        self.port = await self.rpc.start()
        log.info("gRPC listening on port %d; warming up", self.port)
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self.batcher.start()
        await self._warm_up()
        self._follow = asyncio.get_running_loop().create_task(self.heads.follow(), name="headswap-follow")
        await self.rpc.serving()
        log.info("SERVING on port %d (backbone on %s)", self.port, self.backbone.encoder.provider)
        return self.port

    async def _warm_up(self) -> None:
        """Run the batch shapes serving sees first through the batcher, so no caller pays for kernel set-up."""
        started = time.perf_counter()
        items = self.batcher.policy.max_batch_items
        for _ in range(self.config.warmup_rounds):
            for inputs in self.backbone.preprocessor.warm_up_batches(items):
                await self.batcher.submit(inputs)
        log.info("backbone warm-up done in %.2fs", time.perf_counter() - started)

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        log.info("draining: up to %.0fs for calls in flight", self.config.grace_seconds)
        await self.rpc.stop(self.config.grace_seconds)
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        await self.batcher.stop()
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


def ensure_backbone(config: ServerConfig) -> Path:
    """The backbone directory to serve, exporting the default one on first start."""
    directory = config.backbone_dir
    if (directory / "manifest.json").exists():
        return directory
    if not config.uses_default_backbone:
        raise FileNotFoundError(
            f"--backbone {directory} is not an exported backbone (no manifest.json); "
            "run `headswap export --out DIR` or leave --backbone unset for the default"
        )
    from headswap.server.export.text import export_backbone

    log.info("default backbone not found at %s: exporting it (once)", directory)
    report = export_backbone(directory)
    log.info("exported default backbone in %.1fs", report.seconds)
    return directory


def build(
    config: ServerConfig, *, backbone: Backbone | None = None, store: HeadStore | None = None
) -> Server:
    """Every part of a server, ready to start. `backbone` and `store` replace the configured ones (tests)."""
    import torch

    from headswap.adapters.grouped import HeadStack
    from headswap.server.inference.onnx import load_backbone

    if backbone is None:
        backbone = load_backbone(
            ensure_backbone(config),
            device=config.device,
            precision=config.precision,
            intra_op_threads=config.intra_op_threads,
        )
    if store is None:
        store = open_store(config.store_url)
    torch.set_num_threads(config.train_threads)
    if config.warmup_rounds:
        _warm_up_training(backbone.dim)
    head_device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    log.info("store at %s: %d tenants; heads on %s", config.store_url, len(store.tenants()), head_device)

    metrics = Metrics()
    pools = Pools(
        preprocess=ThreadPoolExecutor(config.worker_threads, thread_name_prefix="headswap-preprocess"),
        backbone=ThreadPoolExecutor(1, thread_name_prefix="headswap-backbone"),
        io=ThreadPoolExecutor(2, thread_name_prefix="headswap-io"),
        train=ThreadPoolExecutor(1, thread_name_prefix="headswap-train"),
    )
    stack = HeadStack(backbone.dim, device=head_device)
    bank = HeadBank(store, backbone.fingerprint, stack)
    items, cost = config.batching.limits(backbone.on_gpu)
    log.info("batches of at most %d inputs and %d padded tokens", items, cost)
    policy = BatchPolicy(
        max_batch_cost=cost,
        max_batch_items=items,
        max_wait_s=config.batching.max_wait_ms / 1000.0,
        max_queue_items=config.batching.max_queue_items,
    )
    batcher = Batcher(backbone, policy, pools.preprocess, pools.backbone, stack, metrics.observe_batch)
    cache = EmbeddingCache(config.store.cache_capacity)
    embedding = EmbeddingService(backbone, batcher, config.limits, metrics)
    heads = HeadService(embedding, bank, store, cache, TenantLocks(), pools.io)
    training = TrainingService(
        embedding, heads, cache, pools.train, config.limits, metrics, device=head_device
    )
    servicer = HeadswapServicer(embedding, heads, training)
    interceptor = CallInterceptor(metrics)
    rpc = GrpcServer(config.host, config.port, config.limits.max_message_bytes, servicer, interceptor)
    server = Server(config, backbone, store, metrics, pools, batcher, bank, heads, rpc)
    _watch(server)
    return server


def _watch(server: Server) -> None:
    m, backbone, bank, store = server.metrics, server.backbone, server.bank, server.store
    m.backbone_info.labels(
        backbone.manifest.name, backbone.fingerprint, backbone.encoder.provider, backbone.encoder.precision
    ).set(1)
    m.watch(m.queue_depth, lambda: server.batcher.queue_depth)
    m.watch(m.heads_resident, lambda: bank.resident()[0])
    m.watch(m.heads_resident_bytes, lambda: bank.resident()[1])
    m.watch(m.tenants, lambda: len(store.tenants()))
    bank.on_swap = m.swaps.inc


def _warm_up_training(dim: int) -> None:
    """PyTorch's first training in a process pays ~0.7 s of one-off set-up; pay it before SERVING."""
    import numpy as np

    from headswap.adapters import TrainConfig, train_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, dim)).astype(np.float32)
    y = np.arange(16, dtype=np.int64) % 2
    for kind in ("linear", "mlp"):
        train_head(x, y, 2, TrainConfig(kind=kind, max_epochs=2, device="cpu"))


def serve(config: ServerConfig) -> int:
    async def main() -> int:
        return await build(config).run()

    return asyncio.run(main())


__all__ = ["SERVICE_NAME", "Server", "build", "serve"]
