"""Several replicas on one real PostgreSQL: every swap is seen everywhere within a second, versions never
collide, a lost listener or a PostgreSQL restart costs resident heads nothing, and a late replica is right."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from headswap.client import Client, HeadswapError
from headswap.server.testing_postgres import PostgresServer
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
PASSWORD = "not-for-logs-7f3a"


def examples(
    banking77: Data, per: int, intents: list[str] = INTENTS, offset: int = 0
) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in intents for t in banking77["train"][i][offset : offset + per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def replica(backbone_dir: Path, dsn: str, log: Path) -> ServerProcess:
    return ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        dsn,
        "--store-migrate",
        "true",
        "--warmup-rounds",
        "0",
        log_path=log,
    )


@pytest.fixture(scope="module")
def cluster(
    backbone_dir: Path, postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[ServerProcess]]]:
    tmp = tmp_path_factory.mktemp("replicas")
    postgres_server.create_database("replicas")
    # A password in the URL (trust authentication ignores it): it must never reach a log.
    dsn = f"postgresql://postgres:{PASSWORD}@/replicas?host={postgres_server.socket_dir}"
    servers = [replica(backbone_dir, dsn, tmp / f"{name}.log") for name in "abc"]
    try:
        for s in servers:
            s.wait_serving()
        yield dsn, servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.terminate()
        for s in servers:
            assert PASSWORD not in s.log(), "the store's password reached a log"


def wait_for_version(target: str, tenant: str, version: int, timeout: float = 5.0) -> float:
    """Seconds until `target` answers with `version` for the tenant."""
    started = time.monotonic()
    with Client(target, retries=0) as client:
        while True:
            if client.classify(tenant, ["where is my card?"])[0].version == version:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{target} still serves an older version of {tenant} after {timeout}s")
            time.sleep(0.02)


def test_trained_on_one_replica_served_by_all_within_a_second(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        v1 = client.adapt_head("shared", *examples(banking77, 6))
    for other in (b, c):
        wait_for_version(other.target, "shared", v1.version)  # resident on b and c now
    with Client(a.target) as client:
        v2 = client.adapt_head("shared", *examples(banking77, 6, offset=6))
    delays = [wait_for_version(other.target, "shared", v2.version) for other in (b, c)]
    assert max(delays) < 1.0, delays


def test_twenty_swaps_under_load(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        first = client.adapt_head("swapper", *examples(banking77, 5)).version
    active = {first}
    seen: dict[int, list[int]] = {}
    failures: list[str] = []
    stop = threading.Event()

    def caller(n: int, target: str) -> None:
        seen[n] = []
        with Client(target, retries=0) as client:
            while not stop.is_set():
                try:
                    seen[n].append(client.classify("swapper", ["I need to top up"])[0].version)
                except HeadswapError as exc:
                    failures.append(f"{exc.code.name}: {exc.details}")

    threads = [threading.Thread(target=caller, args=(n, s.target)) for n, s in enumerate((b, c, b, c))]
    for t in threads:
        t.start()
    try:
        with Client(a.target) as client:
            for i in range(20):
                texts, labels = examples(banking77, 1, offset=10 + i)
                active.add(client.adapt_head("swapper", texts, labels).version)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    for versions in seen.values():
        assert len(versions) > 20
        assert set(versions) <= active, set(versions) - active
        assert versions == sorted(versions), "a caller saw a version older than one it had seen"
        assert versions[-1] == max(active)


def test_concurrent_trainings_of_one_tenant_get_distinct_versions(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, _) = cluster
    results: list[object] = []

    def train(server: ServerProcess, offset: int) -> None:
        with Client(server.target) as client:
            results.append(client.adapt_head("race", *examples(banking77, 5, offset=offset)))

    threads = [threading.Thread(target=train, args=(s, 5 * i)) for i, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    versions = sorted(r.version for r in results)  # type: ignore[attr-defined]
    assert len(versions) == 2 and versions[0] != versions[1]
    with Client(a.target) as client:
        head = client.get_head("race")
        assert head.active_version == versions[-1]  # the pointer is on the later commit
        assert [v.version for v in head.versions] == versions
        for v in versions:
            assert client.classify("race", ["exchange rate?"], version=v)[0].version == v  # both loadable


def test_a_lost_listener_catches_up(cluster, postgres_server: PostgresServer, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, _) = cluster
    with Client(a.target) as client:
        version = client.adapt_head("listener", *examples(banking77, 5)).version
    wait_for_version(b.target, "listener", version)
    killed = postgres_server.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'headswap-listener'"
    )
    assert len(killed) == 3
    with Client(a.target) as client:
        newer = client.adapt_head("listener", *examples(banking77, 5, offset=5)).version
    assert wait_for_version(b.target, "listener", newer, timeout=3.0) < 2.0
    assert "store listener reconnected" in b.log()


def test_a_late_replica_serves_the_right_versions(
    cluster, backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    dsn, (a, _, _) = cluster
    tenants = [f"late-{i}" for i in range(10)]
    with Client(a.target) as client:
        for i in range(50):
            client.adapt_head(
                tenants[i % 10], *examples(banking77, 1, INTENTS[:2], offset=i), validation_fraction=0
            )
        expected = {t: client.get_head(t).active_version for t in tenants}
    with replica(backbone_dir, dsn, tmp_path / "d.log").wait_serving() as late, Client(late.target) as client:
        assert {t: client.classify(t, ["card?"])[0].version for t in tenants} == expected


def test_postgres_restart_costs_resident_heads_nothing(
    cluster, postgres_server: PostgresServer, banking77: Data
) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        version = client.adapt_head("steady", *examples(banking77, 5)).version
    for s in (b, c):
        wait_for_version(s.target, "steady", version)
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def caller(target: str) -> None:
        with Client(target, retries=0) as client:
            while not stop.is_set():
                try:
                    client.classify("steady", ["lost card"])
                    calls[0] += 1
                except HeadswapError as exc:
                    failures.append(f"{exc.code.name}: {exc.details}")

    threads = [threading.Thread(target=caller, args=(s.target,)) for s in (b, c)]
    for t in threads:
        t.start()
    try:
        postgres_server.stop()
        time.sleep(0.5)
        with Client(a.target, retries=0) as client, pytest.raises(HeadswapError) as info:
            client.adapt_head("steady", *examples(banking77, 2, offset=20))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "unreachable" in info.value.details
        assert PASSWORD not in info.value.details
        during = calls[0]
        time.sleep(1.0)
        assert calls[0] > during, "resident heads stopped serving while PostgreSQL was down"
    finally:
        postgres_server.start()
    try:
        # Writes succeed again once the store is back (its pool's reconnection attempts back off: a few s).
        deadline = time.monotonic() + 20
        with Client(a.target) as client:
            while True:
                try:
                    newer = client.adapt_head("steady", *examples(banking77, 2, offset=20)).version
                    break
                except HeadswapError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                    time.sleep(0.2)
        for s in (b, c):
            wait_for_version(s.target, "steady", newer, timeout=10.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []


def test_a_revocation_reaches_every_replica_within_a_second(
    backbone_dir: Path, postgres_server: PostgresServer, banking77: Data, tmp_path: Path
) -> None:
    from headswap.client import Unauthenticated

    dsn = postgres_server.create_database("revocation")
    env = {"HEADSWAP_AUTH_PEPPER": "pepper for the revocation test, long enough"}
    args = (
        "--backbone",
        str(backbone_dir),
        "--store",
        dsn,
        "--store-migrate",
        "true",
        "--warmup-rounds",
        "0",
        "--auth",
        "keys",
    )
    a = ServerProcess(*args, log_path=tmp_path / "a.log", env=env)
    b = ServerProcess(*args, log_path=tmp_path / "b.log", env=env)
    try:
        a.wait_serving()
        b.wait_serving()
        made = subprocess.run(
            [sys.executable, "-m", "headswap.client.cli", "keys", "create", "--admin", "--store", dsn],
            capture_output=True, text=True, env={**os.environ, **env}, check=True,
        )  # fmt: skip
        admin = made.stdout.strip().splitlines()[-1]
        with Client(a.target, api_key=admin) as on_a:
            on_a.adapt_head("revoked-tenant", *examples(banking77, 4))
            key = on_a.create_api_key("tenant", "revoked-tenant")
        with Client(b.target, api_key=key.key, retries=0) as on_b:
            assert on_b.classify("", ["card?"])[0].version == 1  # cached on b now
            with Client(a.target, api_key=admin) as on_a:
                on_a.revoke_api_key(key.info.id)
            started = time.monotonic()
            while True:
                try:
                    on_b.classify("", ["card?"])
                except Unauthenticated:
                    break
                assert time.monotonic() - started < 1.0, "b still accepts a key revoked on a"
                time.sleep(0.02)
    finally:
        a.terminate()
        b.terminate()
