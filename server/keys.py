"""API keys: `hsk_<id>_<secret>`, a 256-bit secret from `secrets`, stored only as HMAC-SHA256 under a
server-side pepper, looked up by id and compared in constant time.

The id is public (it appears in ListApiKeys and in logs as the caller's name); the secret is shown once, when
the key is created, and never stored: a copy of the store without the pepper cannot yield a usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

PREFIX = "hsk"
_ID_BYTES = 8  # 16 hex characters: unique among any realistic number of keys, and easy to quote
_SECRET_BYTES = 32  # 256 bits
KEY_PATTERN = re.compile(r"^hsk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
ROLES = ("tenant", "admin")


@dataclass(frozen=True)
class ApiKey:
    """What the store keeps of a key: never the secret, only its HMAC."""

    id: str
    role: str  # "tenant" or "admin"
    tenant: str | None  # the tenant of a tenant key
    digest: str  # hex HMAC-SHA256(pepper, secret)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    name: str = ""  # the operator's note: what the key is for

    def problem(self, now: float) -> str:
        """Why the key does not authenticate now ("" when it does)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return ""


def digest(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def new_key(
    pepper: bytes, role: str, tenant: str | None, expires_at: float | None = None, name: str = ""
) -> tuple[str, ApiKey]:
    """A new key: (the full key string, shown once; its record for the store)."""
    if role not in ROLES:
        raise ValueError(f"role must be tenant or admin, not {role!r}")
    if (role == "tenant") != (tenant is not None):
        raise ValueError("a tenant key names exactly one tenant; an admin key names none")
    key_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    record = ApiKey(key_id, role, tenant, digest(pepper, secret), time.time(), expires_at, None, name)
    return f"{PREFIX}_{key_id}_{secret}", record


def parse(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    match = KEY_PATTERN.fullmatch(key)
    return (match.group(1), match.group(2)) if match else None


def matches(record: ApiKey, pepper: bytes, secret: str) -> bool:
    return hmac.compare_digest(record.digest, digest(pepper, secret))
