"""`headswap store copy --from DIR --to postgresql://...`: move a local store into the shared one.

Every tenant is copied whole (versions with their numbers and weights, the active pointer and its
predecessor, the examples, the cached embeddings) in one transaction per tenant, and verified by reading it
back (each version's weights sha256, the examples). Running it again copies nothing twice: a tenant already
there with the same versions is skipped; one there with different versions is left alone and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headswap.server.store.base import Change, TenantState, example_to_json, sealed, weights_digest
from headswap.server.store.local import LocalStore
from headswap.server.store.postgres import PostgresStore
from headswap.server.store.postgres_schema import jsonb


@dataclass(frozen=True)
class Copied:
    tenant: str
    outcome: str  # "copied", "already there", "conflict", "damaged"
    detail: str = ""


def copy_tenant(source: LocalStore, target: PostgresStore, tenant: str) -> Copied:
    try:
        state = source.state(tenant)
        versions = [source.load_version(tenant, v) for v in state.versions]
        examples = source.examples(tenant)
    except Exception as exc:  # a quarantined tenant stays behind, with the reason
        return Copied(tenant, "damaged", str(exc))
    shas = {v.version: weights_digest(v.weights) for v in versions}
    with target.transaction("copy a tenant") as conn:
        existing = {
            int(v): str(sha)
            for v, sha in conn.execute(
                "SELECT version, weights_sha256 FROM headswap_versions WHERE tenant = %s", (tenant,)
            )
        }
        if existing:
            return Copied(
                tenant, "already there" if existing == shas else "conflict", f"versions {sorted(existing)}"
            )
        conn.execute(
            "INSERT INTO headswap_tenants (tenant, next_version) VALUES (%s, %s)",
            (tenant, source.last_version(tenant) + 1),  # numbers given out before are never reused
        )
        example_id = conn.execute(
            "INSERT INTO headswap_example_sets (tenant, examples) VALUES (%s, %s) RETURNING id",
            (tenant, jsonb([example_to_json(e) for e in examples])),
        ).fetchone()[0]
        for v in versions:
            manifest = sealed({**v.manifest, "version": v.version, "weights_sha256": shas[v.version]})
            conn.execute(
                "INSERT INTO headswap_versions (tenant, version, manifest, weights, weights_sha256) "
                "VALUES (%s, %s, %s, %b, %s)",
                (tenant, v.version, jsonb(manifest), v.weights, shas[v.version]),
            )
        seq = target.tick(conn)
        conn.execute(
            "UPDATE headswap_tenants SET active_version = %s, previous_version = %s, examples_id = %s, seq = %s "
            "WHERE tenant = %s",
            (state.active_version, state.previous_version, example_id, seq, tenant),
        )
        target.record_change(
            conn, Change(tenant, state.active_version, seq, weights_sha256=shas.get(state.active_version, ""))
        )
    for fingerprint in source.fingerprints(tenant):
        target.save_embeddings(tenant, fingerprint, source.cached_embeddings(tenant, fingerprint))
    return verify(source, target, tenant, state, shas)


def verify(
    source: LocalStore, target: PostgresStore, tenant: str, state: TenantState, shas: dict[int, str]
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
    source = LocalStore(source_dir)
    target = PostgresStore(target_url, migrate_schema=True, listen=False)
    try:
        return [copy_tenant(source, target, tenant) for tenant in source.tenants()]
    finally:
        target.close()
