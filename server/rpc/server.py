"""The gRPC server: its port (plaintext or TLS), the headswap service, health and reflection."""

from __future__ import annotations

import logging
import time

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headswap.server.config import TlsConfig
from headswap.server.rpc.interceptors import CallInterceptor
from headswap.server.rpc.servicer import HeadswapServicer
from headswap.server.rpc.tls import CertificateFiles
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HeadswapService"].full_name


class GrpcServer:
    """Built up front; the aio server and the health servicer bind to the running loop, so `start` makes them.
    With TLS, `health_port` (when set) serves grpc.health.v1 alone in plaintext: Kubernetes' gRPC probes and
    Docker's HEALTHCHECK cannot speak TLS, and a health status is no secret."""

    def __init__(
        self,
        host: str,
        port: int,
        max_message_bytes: int,
        servicer: HeadswapServicer,
        interceptor: CallInterceptor,
        tls: TlsConfig | None = None,
        health_port: int = 0,
    ) -> None:
        self.host = host
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.servicer = servicer
        self.interceptor = interceptor
        self.tls = tls if tls is not None and tls.enabled else None
        self.health_port = health_port
        self._server: aio.Server | None = None
        self._health_server: aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None

    async def start(self) -> int:
        """Listen (health says NOT_SERVING); returns the bound port."""
        server = aio.server(
            interceptors=[self.interceptor],
            options=[
                # Explicit limits: past them gRPC answers RESOURCE_EXHAUSTED before any work is done.
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
        )
        pb_grpc.add_HeadswapServiceServicer_to_server(self.servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.tls is not None:
            port = server.add_secure_port(self.address, CertificateFiles(self.tls).credentials())
        else:
            port = server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"could not listen on {self.address}")
        await server.start()
        self._server = server
        if self.health_port:
            health_only = aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, health_only)
            if health_only.add_insecure_port(f"{self.host}:{self.health_port}") == 0:
                raise OSError(f"could not listen on {self.host}:{self.health_port} (health)")
            await health_only.start()
            self._health_server = health_only
            log.info("grpc.health.v1 alone, in plaintext, on port %d", self.health_port)
        return port

    async def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        if self._health is not None:
            for name in ("", SERVICE_NAME):
                await self._health.set(name, status)

    async def serving(self) -> None:
        """Take calls: open the interceptor's gate and say SERVING."""
        self.interceptor.open = True
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, let calls in flight finish within `grace` seconds."""
        self.interceptor.draining = True  # before any await: a call that comes in from now on is refused
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.interceptor.grace_ends = time.monotonic() + grace
        if self._server is not None:
            # gRPC's own stop cancels a call that arrives while it runs (the caller saw CANCELLED, not the
            # UNAVAILABLE it would retry elsewhere): the port stays open, refusing new calls through the
            # interceptor, until the calls in flight are done or the grace period is over.
            await self.interceptor.drained(grace)
            await self._server.stop(max(0.0, self.interceptor.grace_ends - time.monotonic()))
        if self._health_server is not None:
            await self._health_server.stop(0)
