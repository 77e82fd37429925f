"""The local store's embedding cache and API keys, as a mixin of `LocalStore` (which provides `root`,
`tenant_dir` and `feed`), like `postgres_extras.py` for the PostgreSQL store.

Layout:
    tenants/<tenant>/embeddings/<fingerprint>.safetensors   cached embeddings of a tenant's examples: keys,
                                                             vectors, and per row the sha256 of key + vector
    keys/<id>.json                                           API keys (HMACs of their secrets, never secrets)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.errors import NotFound
from headswap.server.keys import ApiKey
from headswap.server.store.base import (
    CachedVectors,
    Change,
    ChangeFeed,
    key_from_json,
    key_to_json,
    no_key,
    row_check,
)
from headswap.server.store.files import atomic_write, disk_full_is_exhaustion, json_bytes, next_seq

KEY_ID = re.compile(r"[0-9a-f]{16}")


class LocalExtras:
    # Provided by LocalStore.
    root: Path
    feed: ChangeFeed
    tenant_dir: Callable[[str], Path]
    _publish: Callable[[Change], None]
    _writing: Callable[[], contextlib.AbstractContextManager[Any]]

    # -- the embedding cache -----------------------------------------------------------------------------

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

    # -- API keys: keys/<id>.json, written atomically ----------------------------------------------------

    def _key_path(self, key_id: str) -> Path:
        if not KEY_ID.fullmatch(key_id):
            raise no_key(key_id)
        return self.root / "keys" / f"{key_id}.json"

    def put_key(self, key: ApiKey) -> None:
        path = self._key_path(key.id)
        with self._writing(), disk_full_is_exhaustion("store an API key"):
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, json_bytes(key_to_json(key)))

    def get_key(self, key_id: str) -> ApiKey | None:
        try:
            return key_from_json(json.loads(self._key_path(key_id).read_text()))
        except (FileNotFoundError, NotFound):
            return None

    def list_keys(self) -> list[ApiKey]:
        directory = self.root / "keys"
        keys = (
            [key_from_json(json.loads(p.read_text())) for p in directory.glob("*.json")]
            if directory.is_dir()
            else []
        )
        return sorted(keys, key=lambda k: k.created_at)

    def revoke_key(self, key_id: str, at: float) -> ApiKey:
        with self._writing():
            key = self.get_key(key_id)
            if key is None:
                raise no_key(key_id)
            key = dataclasses.replace(key, revoked_at=key.revoked_at or at)
            self.put_key(key)
            self._publish(Change("", 0, next_seq(0), key_id=key_id))
        return key
