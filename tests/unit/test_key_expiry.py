"""Issue 23, item 5: `headswap keys create --store ... --ttl-days 3000000` is refused before anything is stored
(it printed an error and stored the key anyway), and a key stored with any expiry still lists, offline and
through the API's codec."""

from __future__ import annotations

from pathlib import Path

import pytest

from headswap.client.cli import main
from headswap.server.keys import new_key
from headswap.server.rpc.codec import key_info_to_pb
from headswap.server.store.local import LocalStore

PEPPER = "a-pepper-long-enough-for-the-tests-0123456789"


def test_an_expiry_past_the_range_is_refused_and_nothing_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HEADSWAP_AUTH_PEPPER", PEPPER)
    store = tmp_path / "store"
    rc = main(["keys", "create", "--store", str(store), "--tenant", "a", "--ttl-days", "3000000"])
    assert rc != 0 and "at most 36500" in capsys.readouterr().err
    assert not list(store.glob("keys/*.json")), "the refused key was stored"
    assert main(["keys", "create", "--store", str(store), "--tenant", "a", "--ttl-days", "30"]) == 0


def test_a_key_stored_with_any_expiry_still_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSWAP_AUTH_PEPPER", PEPPER)
    store = LocalStore(tmp_path / "store")
    _, record = new_key(PEPPER.encode(), "tenant", "a", expires_at=1e15)  # as a key stored before the check
    store.put_key(record)
    assert key_info_to_pb(record).expires_at.ToSeconds() >= 253402300798  # 9999-12-31T23:59:59Z
    assert main(["keys", "list", "--store", str(tmp_path / "store")]) == 0
