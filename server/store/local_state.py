"""The local store's reading side and its commit point, state.json (written by `write_state`), as the base of
`LocalStore` (local.py: the layout, and every write). A file that cannot be read quarantines its tenant alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headswap.server.domain import Example
from headswap.server.errors import DataLoss, NotFound
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import (
    HeadStore,
    StoredVersion,
    TenantState,
    example_from_json,
    no_head,
    verify_weights,
)
from headswap.server.store.files import (
    EXAMPLES_REF,
    atomic_write,
    holds_data,
    json_bytes,
    recorded_last_version,
)
from headswap.server.store.requests import find_request, with_request
from headswap.server.validation import check_tenant

log = logging.getLogger("headswap.server.store.local")


class _Replaced(Exception):
    """A file a read was looking for was replaced by a newer one while it ran (not damage)."""


class LocalState(HeadStore):
    root: Path
    tenants_dir: Path

    # -- paths; tenant names are checked at the edge, and again here because they become paths.
    def tenant_dir(self, tenant: str) -> Path:
        return self.tenants_dir / check_tenant(tenant)

    def version_dir(self, tenant: str, version: int) -> Path:
        return self.tenant_dir(tenant) / "versions" / str(int(version))

    def _read(
        self, tenant: str, path: Path, what: str, still_named: Callable[[], None] | None = None
    ) -> bytes:
        """A file of the tenant: NotFound when the tenant is gone, DataLoss (quarantine) when it is damaged.
        A file found missing is looked for again under the writers' lock, where no write is halfway: a delete,
        a prune or a new commit may have moved it while this read ran. `still_named` then raises (NotFound)
        when the tenant's state no longer names it; a file the state still names that is not there is
        damage."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if not self.tenant_dir(tenant).is_dir():
                raise no_head(tenant) from None
        except OSError as exc:
            raise self.quarantine(tenant, f"{what} cannot be read ({exc.strerror})") from None
        with self._writing():
            try:
                return path.read_bytes()
            except FileNotFoundError:
                if not self.tenant_dir(tenant).is_dir():
                    raise no_head(tenant) from None
                if still_named is not None:
                    still_named()
                raise self.quarantine(tenant, f"{what} is missing") from None
            except OSError as exc:
                raise self.quarantine(tenant, f"{what} cannot be read ({exc.strerror})") from None

    def _read_json(
        self, tenant: str, path: Path, what: str, still_named: Callable[[], None] | None = None
    ) -> Any:
        raw = self._read(tenant, path, what, still_named)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise self.quarantine(tenant, f"{what} is not valid JSON") from None

    def quarantine(self, tenant: str, what: str) -> DataLoss:
        if self.damaged.get(tenant) != what:
            log.warning("tenant %s quarantined: %s", tenant, what)
        return super().quarantine(tenant, what)

    # -- reading -----------------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        # A name starting with "." is a delete in progress or a temporary directory, never a tenant. One whose
        # state.json is missing but whose data is there is a tenant (quarantined), never nothing.
        if not self.tenants_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.tenants_dir.iterdir()
            if not p.name.startswith(".") and ((p / "state.json").exists() or holds_data(p))
        )

    def exists(self, tenant: str) -> bool:
        directory = self.tenant_dir(tenant)
        return (directory / "state.json").exists() or holds_data(directory)

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        """Held by every write (LocalStore's, re-entrant); a read that sees what looks like damage looks again
        under it, where no write is halfway."""
        return contextlib.nullcontext()

    def raw_state(self, tenant: str) -> dict[str, Any]:
        directory = self.tenant_dir(tenant)

        def holds_data_still() -> None:
            # state.json names the rest: without it and without data, the tenant is gone (or being created:
            # its state.json comes before any data). Data left without it under the writers' lock is a lost
            # pointer, damage to report, never a reason to forget the data; seen only outside the lock, it
            # was a delete and a new training of the tenant while this read ran.
            if not holds_data(directory):
                raise no_head(tenant)

        raw = self._read_json(tenant, directory / "state.json", "state.json", holds_data_still)
        try:
            if not isinstance(raw, dict) or not EXAMPLES_REF.fullmatch(str(raw.get("examples", ""))):
                raise TypeError  # the examples name becomes a path: only a sha256 (or nothing) is one
            versions = [int(v) for v in raw["versions"]]
            for key in ("active_version", "previous_version", "seq"):
                int(raw.get(key, 0))
            if sorted(set(versions)) != versions:
                raise ValueError
            if int(raw.get("active_version", 0)) not in (0, *versions):
                raise self.quarantine(
                    tenant, f"state.json names active version {raw['active_version']}, which it does not list"
                )
        except (TypeError, KeyError, ValueError):
            raise self.quarantine(tenant, "state.json does not describe a state") from None
        return dict(raw)

    def state(self, tenant: str) -> TenantState:
        raw = self.raw_state(tenant)
        return TenantState(
            tenant,
            int(raw["active_version"]),
            tuple(int(v) for v in raw["versions"]),
            int(raw.get("seq", 0)),
            int(raw.get("previous_version", 0)),
        )

    def manifest(self, tenant: str, version: int) -> HeadManifest:
        self.state(tenant).require(version)
        data = self._read_json(
            tenant,
            self.version_dir(tenant, version) / "head.json",
            f"version {version}'s head.json",
            lambda: self.state(tenant).require(version),
        )
        return self.checked_manifest(tenant, version, data)

    def load_version(self, tenant: str, version: int) -> StoredVersion:
        manifest = self.manifest(tenant, version)
        path = self.version_dir(tenant, version) / "weights.safetensors"
        weights = self._read(
            tenant, path, f"version {version}'s weights", lambda: self.state(tenant).require(version)
        )
        try:
            verify_weights(tenant, version, manifest.weights_sha256, weights)
        except DataLoss:
            raise self.quarantine(
                tenant, f"version {version}'s weights do not match their recorded sha256"
            ) from None
        return StoredVersion(version, manifest, weights)

    def _examples_path(self, tenant: str, raw_state: dict[str, Any]) -> Path | None:
        ref = raw_state.get("examples")
        if ref is None:  # written before example sets were content-addressed
            legacy = self.tenant_dir(tenant) / "examples.json"
            return legacy if legacy.exists() else None
        return self.tenant_dir(tenant) / "examples" / f"{ref}.json" if ref else None

    def examples_ref(self, tenant: str) -> str:
        """The name of the tenant's current example set ("" for none)."""
        return str(self.raw_state(tenant).get("examples") or "")

    def examples(self, tenant: str) -> list[Example]:
        try:
            raw_state = self.raw_state(tenant)
        except NotFound:
            return []
        path = self._examples_path(tenant, raw_state)
        if path is None:
            return []

        def still_named() -> None:
            # A commit that replaced the set (and pruned this one) while this read ran: the set now named.
            if self._examples_path(tenant, self.raw_state(tenant)) != path:
                raise _Replaced

        try:
            raw = self._read_json(tenant, path, "the examples file", still_named)
        except _Replaced:
            with self._writing():
                return self.examples(tenant)
        try:
            return [example_from_json(e) for e in raw["examples"]]
        except (TypeError, KeyError, ValueError):
            raise self.quarantine(tenant, "the examples file does not hold examples") from None

    def last_version(self, tenant: str) -> int:
        """The highest version number the tenant was ever given (0 for none), deleted versions included."""
        raw = self.raw_state(tenant)
        return max([recorded_last_version(raw), *(int(v) for v in raw["versions"])])

    def request_record(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        try:
            raw = self.raw_state(tenant)
        except NotFound:
            return None
        return find_request(raw.get("requests"), request_id)

    def write_state(self, state: TenantState, examples: str, request: dict[str, Any] | None = None) -> None:
        """Write the tenant's state.json (its commit point), adding `request` to the request ids it keeps."""
        path = self.tenant_dir(state.tenant) / "state.json"
        try:  # the number given out last, and the request ids, survive every rewrite (a deletion, a repair)
            old = json.loads(path.read_bytes())
            before, requests = recorded_last_version(old), old.get("requests")
        except (OSError, ValueError, TypeError, AttributeError):
            before, requests = 0, None
        atomic_write(
            path,
            json_bytes(
                {
                    "active_version": state.active_version,
                    "previous_version": state.previous_version,
                    "versions": list(state.versions),
                    "last_version": max([before, *state.versions]),
                    "examples": examples,
                    "seq": state.seq,
                    "requests": with_request(requests, request),
                    "updated_at": time.time(),
                }
            ),
        )
