"""TLS for the gRPC port, with certificates re-read when their files change.

gRPC's dynamic server credentials ask `fetch` for a new configuration on every new connection; it returns
one only when a file's modification time or size changed (a cert-manager Secret update swaps the files), so
a renewed certificate serves new connections without a restart, and connections already open keep theirs.
A file caught half-written is retried on the next connection, with the old certificate meanwhile.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from headswap.server.config import TlsConfig, warn_if_readable_by_others

log = logging.getLogger(__name__)


class CertificateFiles:
    def __init__(self, tls: TlsConfig) -> None:
        if tls.cert is None or tls.key is None:
            raise ValueError("TLS needs a certificate and a key")
        self.cert, self.key, self.client_ca = tls.cert, tls.key, tls.client_ca
        self._stamp: tuple[tuple[int, int], ...] = ()
        warn_if_readable_by_others(self.key, "the TLS private key")

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stamp_now(self) -> tuple[tuple[int, int], ...]:
        stats = [os.stat(p) for p in self._paths()]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        self._stamp = self._stamp_now()
        return self._configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except (OSError, ValueError) as exc:
            log.warning("TLS files not reloaded (%s); new connections keep the previous certificate", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cert)
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=self.client_ca is not None
        )
