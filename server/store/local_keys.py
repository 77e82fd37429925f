"""The local store's API keys, as a mixin of `LocalStore` (which provides `root`, `_publish` and `_writing`).

Layout:
    keys/<id>.json      API keys (HMACs of their secrets, never secrets), each written atomically
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headswap.server.errors import NotFound
from headswap.server.keys import ApiKey
from headswap.server.store.base import Change, key_from_json, key_to_json, no_key
from headswap.server.store.files import atomic_write, disk_full_is_exhaustion, json_bytes, next_seq

KEY_ID = re.compile(r"[0-9a-f]{16}")


class LocalKeys:
    # Provided by LocalStore.
    root: Path
    _publish: Callable[[Change], None]
    _writing: Callable[[], contextlib.AbstractContextManager[Any]]

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
