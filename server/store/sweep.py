"""What a local store does at start-up: remove what a crash may have left."""

from __future__ import annotations

import contextlib
import shutil
from typing import TYPE_CHECKING

from headswap.server.errors import DataLoss, NotFound
from headswap.server.store.files import holds_data

if TYPE_CHECKING:
    from headswap.server.store.local import LocalStore


def sweep(store: LocalStore) -> None:
    """Remove what a crash may have left (temporary files, deletes that did not finish, versions and
    example sets no state names); quarantine, and leave untouched, tenants whose state is damaged."""
    for tenant_dir in store.tenants_dir.iterdir():
        if tenant_dir.name.startswith("."):
            shutil.rmtree(tenant_dir, ignore_errors=True)
            continue
        tenant = tenant_dir.name
        for tmp in tenant_dir.rglob(".*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if not (tenant_dir / "state.json").exists():
            if not holds_data(tenant_dir):  # a cache, temporary files: nothing that is data
                shutil.rmtree(tenant_dir, ignore_errors=True)
            else:  # a lost pointer: quarantined and reported, never a reason to delete data
                _quarantine_missing_state(store, tenant)
            continue
        try:
            raw = store.raw_state(tenant)
        except (DataLoss, NotFound, ValueError):
            continue  # quarantined and logged: a repair decides, not the sweep
        known = {int(v) for v in raw["versions"]}
        versions = tenant_dir / "versions"
        if versions.is_dir():
            for entry in versions.iterdir():
                if not entry.name.isdigit() or int(entry.name) not in known:
                    shutil.rmtree(entry, ignore_errors=True)
        current = raw.get("examples")
        if current is not None and (tenant_dir / "examples").is_dir():
            for entry in (tenant_dir / "examples").iterdir():
                if entry.name != f"{current}.json":
                    entry.unlink(missing_ok=True)
        if not known and not current and not holds_data(tenant_dir):
            # A state that names nothing: written before a new tenant's first commit, which never came.
            shutil.rmtree(tenant_dir, ignore_errors=True)


def _quarantine_missing_state(store: LocalStore, tenant: str) -> None:
    with contextlib.suppress(DataLoss):  # recorded in store.damaged, logged
        store.raw_state(tenant)
