"""`headswap store copy --from DIR --to postgresql://...`: move a local store into the shared one.

Every tenant is copied whole (versions with their numbers and weights, the active pointer and its
predecessor, the examples, the cached embeddings) in one transaction per tenant (`restore`), and verified by
reading it back (each version's weights sha256, the examples). Running it again copies nothing twice: a
tenant already there with the same versions is skipped; one there with different versions is left alone and
reported. Both sides are seen through the store protocols (store/base.py); any store that can `restore` a
tenant (a `RestoringStore`) can be the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headswap.server.store.base import (
    Examples,
    HeadStore,
    RestoringStore,
    TenantCopy,
    TenantState,
    example_to_json,
    weights_digest,
)


@dataclass(frozen=True)
class Copied:
    tenant: str
    outcome: str  # "copied", "already there", "conflict", "damaged"
    detail: str = ""


def copy_tenant(source: HeadStore, target: RestoringStore, tenant: str) -> Copied:
    try:
        state = source.state(tenant)
        versions = [source.load_version(tenant, v) for v in state.versions]
        copied = TenantCopy(state, versions, source.examples(tenant), source.last_version(tenant))
    except Exception as exc:  # a quarantined tenant stays behind, with the reason
        return Copied(tenant, "damaged", str(exc))
    shas = {v.version: weights_digest(v.weights) for v in versions}
    existing = target.restore(tenant, copied)
    if existing:
        return Copied(
            tenant, "already there" if existing == shas else "conflict", f"versions {sorted(existing)}"
        )
    for fingerprint in source.fingerprints(tenant):
        target.save_embeddings(tenant, fingerprint, source.cached_embeddings(tenant, fingerprint))
    return verify(source, target, tenant, state, shas)


def verify(
    source: Examples, target: RestoringStore, tenant: str, state: TenantState, shas: dict[int, str]
) -> Copied:
    copied = target.state(tenant)
    problems = []
    if (copied.versions, copied.active_version, copied.previous_version) != (
        state.versions,
        state.active_version,
        state.previous_version,
    ):
        problems.append(f"state {copied} != {state}")
    for version, sha in shas.items():
        if weights_digest(target.load_version(tenant, version).weights) != sha:
            problems.append(f"version {version}'s weights differ")
    if json.dumps([example_to_json(e) for e in target.examples(tenant)]) != json.dumps(
        [example_to_json(e) for e in source.examples(tenant)]
    ):
        problems.append("examples differ")
    return Copied(tenant, "conflict" if problems else "copied", "; ".join(problems))


def copy_store(source_dir: Path, target_url: str) -> list[Copied]:
    from headswap.server.store.local import LocalStore
    from headswap.server.store.postgres import PostgresStore

    source = LocalStore(source_dir)
    target = PostgresStore(target_url, migrate_schema=True, listen=False)
    try:
        return [copy_tenant(source, target, tenant) for tenant in source.tenants()]
    finally:
        target.close()
