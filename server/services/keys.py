"""API keys: who a call comes from (`authenticate`), and their management (admin only).

A key is looked up by its id and checked against its HMAC in constant time. Records are cached (a call
must not cost a store query); a revocation anywhere reaches the cache through the store's change feed,
the same path head swaps take, and expiry is checked on every call. Unknown ids are remembered briefly, so
that a flood of made-up keys costs the store one query per id, not one per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass, field

from headswap.server import keys
from headswap.server.domain import ANONYMOUS, Caller, CreateKeyRequest
from headswap.server.errors import InvalidArgument, Unauthenticated
from headswap.server.keys import ApiKey
from headswap.server.metrics import Metrics
from headswap.server.store import HeadStore
from headswap.server.validation import check_tenant

log = logging.getLogger(__name__)

MAX_TTL_S = 100 * 365 * 86400  # a key that should outlive a century should not expire at all

CACHE_SIZE = 10_000
UNKNOWN_TTL_S = 5.0


@dataclass(eq=False)
class KeyService:
    store: HeadStore
    pepper: bytes | None  # None: authentication is off (--auth none), every caller is ANONYMOUS
    io: Executor
    metrics: Metrics
    _cache: OrderedDict[str, tuple[ApiKey | None, float]] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return self.pepper is not None

    def _fail(self, reason: str, message: str) -> Unauthenticated:
        self.metrics.auth_failures.labels(reason).inc()
        return Unauthenticated(message)

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a call with this `authorization` metadata value, or UNAUTHENTICATED."""
        if self.pepper is None:
            return ANONYMOUS
        if not authorization:
            raise self._fail("missing", "no API key: send the metadata `authorization: Bearer hsk_...`")
        scheme, _, token = authorization.strip().partition(" ")
        parsed = keys.parse(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise self._fail("malformed", "the authorization metadata must be `Bearer hsk_<id>_<secret>`")
        key_id, secret = parsed
        record = await self._lookup(key_id)
        # One answer for an unknown id and a wrong secret: which ids exist is nobody's business.
        if record is None or not keys.matches(record, self.pepper, secret):
            raise self._fail("unknown", "the API key is not valid")
        problem = record.problem(time.time())
        if problem:
            raise self._fail(problem, f"the API key was {problem}: ask an admin for a new one")
        if record.role == "admin":
            return Caller(name=record.id, tenant=None, admin=True)
        return Caller(name=record.id, tenant=record.tenant, admin=False)

    async def _lookup(self, key_id: str) -> ApiKey | None:
        cached = self._cache.get(key_id)
        now = time.monotonic()
        if cached is not None and (cached[0] is not None or now - cached[1] < UNKNOWN_TTL_S):
            self._cache.move_to_end(key_id)
            return cached[0]
        record = await asyncio.get_running_loop().run_in_executor(self.io, self.store.get_key, key_id)
        self._cache[key_id] = (record, now)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return record

    def forget(self, key_id: str) -> None:
        """A key changed (revoked, somewhere): the next call reads it again."""
        self._cache.pop(key_id, None)

    # -- management (admin only) ---------------------------------------------------------------------------

    def _pepper(self) -> bytes:
        if self.pepper is None:
            raise InvalidArgument("this server runs without API keys (--auth none): there are none to manage")
        return self.pepper

    async def create(self, request: CreateKeyRequest) -> tuple[str, ApiKey]:
        request.caller.require_admin("CreateApiKey")
        pepper = self._pepper()
        if request.role not in keys.ROLES:
            raise InvalidArgument(f"role must be tenant or admin, not {request.role!r}")
        tenant = check_tenant(request.tenant or "") if request.role == "tenant" else None
        if request.role == "admin" and request.tenant:
            raise InvalidArgument("an admin key acts for every tenant: leave `tenant` empty")
        if request.ttl_s is not None and not 0 < request.ttl_s <= MAX_TTL_S:
            # The upper bound keeps every expiry a valid timestamp (years 1 to 9999) in replies and listings.
            raise InvalidArgument(
                f"ttl must be positive and at most {MAX_TTL_S // 86400} days (or unset for a key that does not "
                "expire)"
            )
        if len(request.name) > 200:
            raise InvalidArgument("name must be at most 200 characters")
        expires = time.time() + request.ttl_s if request.ttl_s is not None else None
        key, record = keys.new_key(pepper, request.role, tenant, expires, request.name)
        await asyncio.get_running_loop().run_in_executor(self.io, self.store.put_key, record)
        log.info("an API key was created (%s)", record.role)  # never its id: keys stay out of logs
        return key, record

    async def list(self, caller: Caller) -> list[ApiKey]:
        caller.require_admin("ListApiKeys")
        self._pepper()
        return await asyncio.get_running_loop().run_in_executor(self.io, self.store.list_keys)

    async def revoke(self, key_id: str, caller: Caller) -> ApiKey:
        caller.require_admin("RevokeApiKey")
        self._pepper()
        record = await asyncio.get_running_loop().run_in_executor(
            self.io, self.store.revoke_key, key_id, time.time()
        )
        self.forget(key_id)
        log.info("an API key was revoked")
        return record
