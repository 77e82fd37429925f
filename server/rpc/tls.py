"""TLS for the gRPC port, with certificates re-read when their files change.

gRPC's dynamic server credentials ask `fetch` for a new configuration on every new connection; it returns
one only when a file's modification time or size changed (a cert-manager Secret update swaps the files), so
a renewed certificate serves new connections without a restart, and connections already open keep theirs.
A configuration is checked before gRPC gets it (the key matches the certificate, every file parses): files
caught half-way through a rotation, or damaged, are reported once in the log and retried on the next
connection, and new connections keep the certificate in use meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
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
        self._refused: tuple[tuple[int, int], ...] = ()  # files found unusable: reported once

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _stamp_now(self) -> tuple[tuple[int, int], ...]:
        stats = [os.stat(p) for p in self._paths()]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert = self.key.read_bytes(), self.cert.read_bytes()
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        check(cert, key, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        self._stamp = self._stamp_now()
        return self._configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp: tuple[tuple[int, int], ...] = ()
        try:
            stamp = self._stamp_now()
            if stamp in (self._stamp, self._refused):
                return None
            configuration = self._configuration()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._refused = stamp
            log.warning(
                "TLS files not reloaded (%s: %s); new connections keep the previous certificate",
                type(exc).__name__,
                exc,
            )
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cert)
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=self.client_ca is not None
        )


def check(cert: bytes, key: bytes, ca: bytes | None) -> None:
    """Raise ssl.SSLError (or ValueError) unless `cert` and `key` parse and belong together and `ca` parses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _as_file(cert) as cert_path, _as_file(key) as key_path:
        context.load_cert_chain(cert_path, key_path)
    if ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))


@contextlib.contextmanager
def _as_file(data: bytes) -> Iterator[str]:
    """`data` under a path `ssl` can read: an anonymous memory file on Linux (a key never touches a disk),
    else a private temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("headswap-tls")
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="headswap-tls-") as directory:
        path = Path(directory) / "pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        yield str(path)
