"""The server process: gRPC, health, reflection, start-up order and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headswap.server.backbone import Backbone
from headswap.server.cache import EmbeddingCache
from headswap.server.config import ServerConfig
from headswap.server.headbank import HeadBank
from headswap.server.heads import HeadService
from headswap.server.interceptors import ErrorInterceptor
from headswap.server.metrics import Metrics
from headswap.server.service import EmbeddingService
from headswap.server.servicer import HeadswapServicer
from headswap.server.store import HeadStore, LocalStore
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HeadswapService"].full_name


class Server:
    """One headswap server. `run()` serves until SIGTERM or SIGINT, then drains and returns 0."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="headswap-worker")
        self.io_executor = ThreadPoolExecutor(2, thread_name_prefix="headswap-io")
        # One training at a time: a training must never take the threads that serve requests.
        self.train_executor = ThreadPoolExecutor(1, thread_name_prefix="headswap-train")
        self.embedding = EmbeddingService(config, self.executor)
        self.store: HeadStore | None = None
        self.cache = EmbeddingCache(config.cache_capacity)
        self.heads: HeadService | None = None
        self.metrics = Metrics()
        self.metrics_port = 0
        self.port = 0
        # gRPC's aio server, the health servicer and the stop event bind to the running loop: made in start().
        self.grpc: aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self._stop: asyncio.Event | None = None

    def _build(self) -> aio.Server:
        server = aio.server(
            interceptors=[ErrorInterceptor(self.metrics)],
            options=[
                # Explicit limits: past them gRPC answers RESOURCE_EXHAUSTED before any work is done.
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
            ],
        )
        assert self.heads is not None
        servicer = HeadswapServicer(self.embedding, self.heads, self.config.max_message_bytes, self.metrics)
        pb_grpc.add_HeadswapServiceServicer_to_server(servicer, server)
        assert self.health is not None
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        return server

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        assert self.health is not None
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Listen at once (health says NOT_SERVING), then load and warm up; SERVING only after that."""
        self._stop = self._stop or asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.store = LocalStore(self.config.store_dir)
        self.heads = HeadService(
            self.config,
            self.embedding,
            self.store,
            self.cache,
            self.io_executor,
            self.train_executor,
            self.metrics,
        )
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self.grpc = self._build()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.host}:{self.config.port}")
        await self.grpc.start()
        log.info("gRPC listening on port %d; loading the backbone", self.port)
        loop = asyncio.get_running_loop()
        backbone = await loop.run_in_executor(self.executor, self.embedding.load)
        bank = await loop.run_in_executor(self.executor, self._head_bank, backbone)
        self.embedding.activate(backbone, heads=bank.stack, on_batch=self.metrics.observe_batch)
        self.heads.attach(bank)
        self._watch(backbone, bank)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING on port %d (backbone on %s)", self.port, backbone.provider)
        return self.port

    def _head_bank(self, backbone: Backbone) -> HeadBank:
        import torch

        from headswap.adapters.grouped import HeadStack

        torch.set_num_threads(self.config.train_threads)
        _warm_up_training(backbone.dim)
        device = "cuda" if self.config.device != "cpu" and torch.cuda.is_available() else "cpu"
        assert self.store is not None
        log.info(
            "store at %s: %d tenants; heads on %s", self.config.store_dir, len(self.store.tenants()), device
        )
        return HeadBank(self.store, backbone.manifest.fingerprint, HeadStack(backbone.dim, device=device))

    def _watch(self, backbone: Backbone, bank: HeadBank) -> None:
        m = self.metrics
        m.backbone_info.labels(
            backbone.manifest.name, backbone.manifest.fingerprint, backbone.provider, backbone.precision
        ).set(1)
        m.watch(m.queue_depth, lambda: self.embedding.batcher.queue_depth)
        m.watch(m.heads_resident, lambda: bank.resident()[0])
        m.watch(m.heads_resident_bytes, lambda: bank.resident()[1])
        store = self.store
        assert store is not None
        m.watch(m.tenants, lambda: len(store.tenants()))
        bank.on_swap = m.swaps.inc

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let calls in flight finish within the grace period."""
        assert self.health is not None and self.grpc is not None
        await self.health.enter_graceful_shutdown()
        log.info("draining: up to %.0fs for calls in flight", self.config.grace_seconds)
        await self.grpc.stop(self.config.grace_seconds)
        await self.embedding.stop()
        for pool in (self.executor, self.io_executor, self.train_executor):
            pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except Exception:
            log.exception("start-up failed")
            if self.grpc is not None:
                await self.grpc.stop(0)
            self.executor.shutdown(wait=False, cancel_futures=True)
            return 1
        await self._stop.wait()
        await self.stop()
        return 0


def _warm_up_training(dim: int) -> None:
    """PyTorch's first training in a process pays ~0.7 s of one-off set-up; pay it before SERVING."""
    import numpy as np

    from headswap.adapters import TrainConfig, train_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, dim)).astype(np.float32)
    y = np.arange(16, dtype=np.int64) % 2
    for kind in ("linear", "mlp"):
        train_head(x, y, 2, TrainConfig(kind=kind, validation_fraction=0.25, max_epochs=2, device="cpu"))


def serve(config: ServerConfig) -> int:
    return asyncio.run(Server(config).run())


__all__ = ["SERVICE_NAME", "Server", "grpc", "serve"]
