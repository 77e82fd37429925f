"""The active-pointer rules (store/pointer.py) every store and `store check --repair` share, as pure functions;
tests/unit/test_store_contract.py checks each backend keeps them."""

from __future__ import annotations

import pytest

from headswap.server.errors import FailedPrecondition, NotFound
from headswap.server.store import TenantState, pointer

STATE = TenantState("t", active_version=3, versions=(1, 2, 3), seq=7, previous_version=2)


def test_a_commit_adds_a_version_and_activating_it_keeps_the_old_one_for_a_rollback() -> None:
    assert pointer.next_version(STATE, 5) == 6 and pointer.next_version(STATE) == 4
    assert pointer.committed(STATE, 4, True, 8) == TenantState("t", 4, (1, 2, 3, 4), 8, 3)
    assert pointer.committed(STATE, 4, False, 8) == TenantState("t", 3, (1, 2, 3, 4), 8, 2)
    first = pointer.committed(TenantState("t", 0, ()), 1, True, 1)
    assert (first.active_version, first.previous_version) == (1, 0)


def test_activation() -> None:
    assert pointer.activated(STATE, 1, 8) == TenantState("t", 1, (1, 2, 3), 8, 3)
    assert pointer.activated(STATE, 3, 8) == TenantState(
        "t", 3, (1, 2, 3), 8, 2
    )  # the same: predecessor kept
    with pytest.raises(NotFound):
        pointer.activated(STATE, 9, 8)


def test_deleting_a_version() -> None:
    assert pointer.without_version(STATE, 2, 8) == TenantState("t", 3, (1, 3), 8, 0)
    assert pointer.without_version(STATE, 1, 8) == TenantState("t", 3, (2, 3), 8, 2)
    with pytest.raises(FailedPrecondition):
        pointer.without_version(STATE, 3, 8)
    with pytest.raises(NotFound):
        pointer.without_version(STATE, 9, 8)


def test_retention_keeps_the_newest_the_active_and_its_predecessor() -> None:
    state = TenantState("t", 1, (1, 2, 3, 4, 5), 7, 2)
    assert pointer.retained(state, 2) == TenantState("t", 1, (1, 2, 4, 5), 7, 2)
    assert pointer.retained(state, 10) == state


def test_a_repair_drops_damaged_versions_and_falls_back_to_an_intact_predecessor() -> None:
    assert pointer.repaired(STATE, {3}, 8) == TenantState("t", 2, (1, 2), 8, 0)
    assert pointer.fallback(STATE, {3}) == 2
    assert pointer.repaired(STATE, {2, 3}, 8) == TenantState("t", 0, (1,), 8, 0)
    assert pointer.fallback(STATE, {2, 3}) == 0
    assert pointer.repaired(STATE, {1}, 8) == TenantState("t", 3, (2, 3), 8, 2)
