"""The local store's embedding cache, as a mixin of `LocalStore` (which provides `tenant_dir` and `_writing`).

Layout:
    tenants/<tenant>/embeddings/<fingerprint>.safetensors   cached embeddings of a tenant's examples: keys,
                                                             vectors, and per row the sha256 of key + vector
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.store.base import CachedVectors, row_check
from headswap.server.store.files import atomic_write


class LocalCache:
    # Provided by LocalStore.
    tenant_dir: Callable[[str], Path]
    _writing: Callable[[], contextlib.AbstractContextManager[Any]]

    def _embeddings_path(self, tenant: str, fingerprint: str) -> Path:
        if not fingerprint.isalnum():
            raise ValueError("fingerprint must be alphanumeric")
        return self.tenant_dir(tenant) / "embeddings" / f"{fingerprint}.safetensors"

    def fingerprints(self, tenant: str) -> list[str]:
        """The backbones the tenant has cached embeddings for."""
        directory = self.tenant_dir(tenant) / "embeddings"
        return sorted(p.stem for p in directory.glob("*.safetensors")) if directory.is_dir() else []

    def cached_embeddings(self, tenant: str, fingerprint: str) -> CachedVectors:
        """The tenant's cached vectors whose row checksum holds; `.dropped` counts the rows (or the file, once,
        when it does not parse) found damaged: they are embedded again, and saved back sound."""
        from safetensors.numpy import load

        path = self._embeddings_path(tenant, fingerprint)
        try:
            data = path.read_bytes()
        except OSError:  # none yet
            return CachedVectors()
        try:
            tensors = load(data)
            keys, vectors, checks = tensors["keys"], tensors["vectors"], tensors["checks"]
            if (
                not (len(keys) == len(vectors) == len(checks))
                or vectors.ndim != 2
                or checks.shape[1:] != (32,)
            ):
                raise ValueError("rows of different counts")
        except (
            Exception
        ):  # damaged, or written before rows had checksums: a cache costs time, never correctness
            return CachedVectors(dropped=1)
        found = CachedVectors()
        for key, vector, check in zip(keys, vectors, checks, strict=True):
            key_bytes = bytes(key)
            if row_check(key_bytes, vector) == bytes(check):
                found[key_bytes] = vector
            else:  # garbled, or moved to another key's row: both fail the check, bound to the key
                found.dropped += 1
        return found

    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None:
        from safetensors.numpy import save

        if not entries:
            return
        keys = np.frombuffer(b"".join(entries), dtype=np.uint8).reshape(len(entries), -1)
        vectors = np.stack(list(entries.values())).astype(np.float32)
        checks = np.frombuffer(
            b"".join(row_check(k, v) for k, v in zip(entries, vectors, strict=True)), dtype=np.uint8
        ).reshape(len(entries), 32)
        path = self._embeddings_path(tenant, fingerprint)
        with self._writing():
            if not (path.parent.parent / "state.json").exists():
                return  # no such tenant (deleted, or not yet committed): a cache never creates one
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, save({"keys": keys, "vectors": vectors, "checks": checks}))
