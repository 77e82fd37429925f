"""`headswap store check [--repair]`: verify every tenant of a local store offline, and mend what can be.

Checked per tenant: state.json parses and describes a state; every version it names has a manifest that
parses, weights whose sha256 matches the one recorded at commit and that load as a head; the example set it
names parses. Repairs never invent data: a damaged version is dropped (and if it was the active one, the
predecessor is activated when intact, otherwise none is), a damaged example set is forgotten (the heads
stay; the next training needs examples), an unreadable or missing state is rebuilt from the intact versions
with none active (and the example set, when exactly one intact one is there). Without `--repair` nothing on
disk changes. The tenant's owner then activates or retrains; DeleteHead works on any tenant.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from headswap.server.errors import DataLoss, NotFound
from headswap.server.store import pointer
from headswap.server.store.base import HeadStore, TenantState
from headswap.server.store.files import next_seq
from headswap.server.store.local import LocalStore


@dataclass(frozen=True)
class Finding:
    tenant: str
    problem: str
    repair: str  # what --repair does (or did)


def _version_problem(store: HeadStore, tenant: str, version: int) -> str | None:
    from headswap.adapters import HeadFormatError, head_from_bytes

    try:
        stored = store.load_version(tenant, version)
        head_from_bytes(stored.weights, stored.manifest.to_json())
    except DataLoss as exc:
        return store.damaged.get(tenant, exc.message)
    except HeadFormatError as exc:
        return f"version {version}'s head does not load: {exc}"
    return None


def check_tenant(store: LocalStore, tenant: str, repair: bool) -> list[Finding]:
    try:
        state = store.state(tenant)
    except NotFound:
        return []
    except DataLoss as exc:
        return [_rebuild(store, tenant, exc.message, repair)]
    findings = []
    bad = {}
    for version in state.versions:
        problem = _version_problem(store, tenant, version)
        if problem:
            bad[version] = problem
    examples_ref = store.examples_ref(tenant)
    try:
        store.examples(tenant)
    except DataLoss:
        findings.append(
            Finding(tenant, "the example set is damaged", "forget it (the next training needs examples)")
        )
        examples_ref = ""
    for version, problem in bad.items():
        action = f"drop version {version}"
        if version == state.active_version:
            fallback = pointer.fallback(state, bad)
            action += f" and activate version {fallback}" if fallback else " and leave no version active"
        findings.append(Finding(tenant, problem, action))
    if repair and findings:
        store.write_state(pointer.repaired(state, bad, next_seq(state.seq)), examples_ref)
        for version in bad:
            shutil.rmtree(store.version_dir(tenant, version), ignore_errors=True)
        store.damaged.pop(tenant, None)
    return findings


def _rebuild(store: LocalStore, tenant: str, message: str, repair: bool) -> Finding:
    problem = store.damaged.get(tenant, message)
    finding = Finding(tenant, problem, "rebuild state.json from the intact versions, none active")
    if not repair:
        return finding
    versions_dir = store.tenant_dir(tenant) / "versions"
    numbers = (
        sorted(int(p.name) for p in versions_dir.glob("*") if p.name.isdigit())
        if versions_dir.is_dir()
        else []
    )
    examples = _lone_example_set(store, tenant)
    store.write_state(TenantState(tenant, 0, tuple(numbers), next_seq(0)), examples)  # lets them be read
    intact = tuple(v for v in numbers if _version_problem(store, tenant, v) is None)
    store.write_state(TenantState(tenant, 0, intact, next_seq(0)), examples)
    for version in set(numbers) - set(intact):
        shutil.rmtree(store.version_dir(tenant, version), ignore_errors=True)
    store.damaged.pop(tenant, None)
    return finding


def _lone_example_set(store: LocalStore, tenant: str) -> str:
    """The tenant's example set when exactly one intact one is on disk (its name is its sha256), else ""."""
    found = [
        p.stem
        for p in (store.tenant_dir(tenant) / "examples").glob("*.json")
        if hashlib.sha256(p.read_bytes()).hexdigest() == p.stem
    ]
    return found[0] if len(found) == 1 else ""


def check_store(root: Path, repair: bool = False) -> list[Finding]:
    """Without `repair`, nothing on disk changes (not even the start-up sweep a server does)."""
    store = LocalStore(root, sweep_at_start=repair)
    findings: list[Finding] = []
    for tenant in store.tenants():
        findings.extend(check_tenant(store, tenant, repair))
    return findings
