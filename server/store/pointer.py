"""The active-pointer rules, in one place: which version a tenant's state points at after each change. Every
store (memory, local, PostgreSQL) and `headswap store check --repair` call these; a store only decides where
the state lives and where its sequence number `seq` comes from.

- A commit adds the version (numbered one past the highest number ever given); when it activates it, the
  version active until then becomes the predecessor kept for a rollback.
- An activation points at an existing version; the one active until then becomes the predecessor (unless it
  is the same version, which keeps the predecessor as it was).
- A deletion of one version never takes the active one; deleting the predecessor forgets it.
- Retention keeps the newest `keep_newest` versions, the active one and its predecessor.
- A repair drops damaged versions; a damaged active version gives way to its predecessor when intact, else
  to none.
"""

from __future__ import annotations

from collections.abc import Collection

from headswap.server.errors import FailedPrecondition
from headswap.server.store.base import TenantState


def next_version(state: TenantState, *given: int) -> int:
    """The number of a new version: one past the state's and every other number known to have been given
    (deleted versions included), so that a number is never given out twice."""
    return max([*state.versions, *given]) + 1


def committed(state: TenantState, version: int, activate: bool, seq: int) -> TenantState:
    active = version if activate else state.active_version
    previous = state.active_version if activate and state.active_version else state.previous_version
    return TenantState(state.tenant, active, (*state.versions, version), seq, previous)


def activated(state: TenantState, version: int, seq: int) -> TenantState:
    """NotFound for a version the tenant does not have."""
    state.require(version)
    previous = state.active_version if state.active_version != version else state.previous_version
    return TenantState(state.tenant, version, state.versions, seq, previous)


def without_version(state: TenantState, version: int, seq: int) -> TenantState:
    """NotFound for a version the tenant does not have; FailedPrecondition for the active one."""
    state.require(version)
    if version == state.active_version:
        raise FailedPrecondition(
            f"version {version} is tenant {state.tenant!r}'s active version: activate another one first"
        )
    previous = 0 if version == state.previous_version else state.previous_version
    versions = tuple(v for v in state.versions if v != version)
    return TenantState(state.tenant, state.active_version, versions, seq, previous)


def retained(state: TenantState, keep_newest: int) -> TenantState:
    """The state a retention limit leaves (the same sequence number: nothing a head bank sees changes)."""
    keep = set(state.versions[-keep_newest:]) | ({state.active_version, state.previous_version} - {0})
    versions = tuple(v for v in state.versions if v in keep)
    return TenantState(state.tenant, state.active_version, versions, state.seq, state.previous_version)


def fallback(state: TenantState, damaged: Collection[int]) -> int:
    """The version a repair activates in place of a damaged active one (0: none)."""
    return state.previous_version if state.previous_version not in damaged else 0


def repaired(state: TenantState, damaged: Collection[int], seq: int) -> TenantState:
    """The state once the `damaged` versions are dropped."""
    keep = tuple(v for v in state.versions if v not in damaged)
    active = state.active_version
    if active in damaged:
        active = state.previous_version if state.previous_version in keep else 0
    previous = (
        state.previous_version if state.previous_version in keep and state.previous_version != active else 0
    )
    return TenantState(state.tenant, active, keep, seq, previous)
