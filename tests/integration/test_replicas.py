"""Several replicas on one real PostgreSQL: every swap and every deleted version is seen everywhere, versions
never collide, a lost listener or a PostgreSQL restart costs resident heads nothing, and a late replica is
right. Waits are for observable conditions (an answer, a lock seen in pg_stat_activity); how fast a change
reaches the other replicas is a figure, measured by `python -m bench.replicas`, not asserted here."""

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

from headswap.client import Client, HeadswapError, NotFound
from headswap.server.testing_postgres import PostgresServer
from tests.helpers import HANG, ServerProcess, raises, until

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
PASSWORD = "not-for-logs-7f3a"


def examples(
    banking77: Data, per: int, intents: list[str] = INTENTS, offset: int = 0
) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in intents for t in banking77["train"][i][offset : offset + per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def replica(
    backbone_dir: Path, dsn: str, log: Path, *flags: str, env: dict[str, str] | None = None
) -> ServerProcess:
    args = (
        "--backbone",
        str(backbone_dir),
        "--store",
        dsn,
        "--store-migrate",
        "true",
        "--warmup-rounds",
        "0",
    )
    return ServerProcess(*args, *flags, log_path=log, env=env)


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


def wait_for_version(target: str, tenant: str, version: int, timeout: float = HANG) -> None:
    """Until `target` answers with `version` for the tenant."""
    with Client(target, retries=0) as client:
        until(
            lambda: client.classify(tenant, ["where is my card?"])[0].version == version,
            f"{target} still serves an older version of {tenant} than {version}",
            timeout,
        )


def test_trained_on_one_replica_served_by_all(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        v1 = client.adapt_head("shared", *examples(banking77, 6))
    for other in (b, c):
        wait_for_version(other.target, "shared", v1.version)  # resident on b and c now
    with Client(a.target) as client:
        v2 = client.adapt_head("shared", *examples(banking77, 6, offset=6))
    for other in (b, c):  # a resident head is swapped by the change feed alone: nothing else reloads it
        wait_for_version(other.target, "shared", v2.version)


def test_a_deleted_version_is_refused_on_every_replica(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        v1 = client.adapt_head("pruned", *examples(banking77, 5)).version
        v2 = client.adapt_head("pruned", *examples(banking77, 5, offset=5), force_activate=True).version
    for other in (b, c):  # each replica holds version 1, asked for by number
        with Client(other.target, retries=0) as client:
            assert client.classify("pruned", ["lost card"], version=v1)[0].version == v1

    def refused(target: str) -> bool:
        with Client(target, retries=0) as client:
            try:
                client.classify("pruned", ["lost card"], version=v1)
            except NotFound:
                return True
            return False

    with Client(a.target) as client:
        assert [v.version for v in client.delete_head_version("pruned", v1).versions] == [v2]
    assert refused(a.target), "the replica that deleted it refuses it at once"
    for other in (b, c):
        until(lambda t=other.target: refused(t), f"{other.target} still serves deleted version {v1}")
        with Client(other.target, retries=0) as client:  # the active version is untouched
            assert client.classify("pruned", ["lost card"])[0].version == v2
    with Client(b.target) as client:  # and its number is never given out again, whichever replica trains
        v3 = client.adapt_head("pruned", *examples(banking77, 5, offset=10)).version
    assert v3 == v2 + 1


def test_twenty_swaps_under_load(cluster, banking77: Data) -> None:  # type: ignore[no-untyped-def]
    _, (a, b, c) = cluster
    with Client(a.target) as client:
        first = client.adapt_head("swapper", *examples(banking77, 5)).version
    active = {first}
    seen: dict[int, list[int]] = {n: [] for n in range(4)}
    failures: list[str] = []
    stop = threading.Event()

    def caller(n: int, target: str) -> None:
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
        until(lambda: all(seen.values()), "every caller answered once before the swaps")
        with Client(a.target) as client:
            for i in range(20):
                texts, labels = examples(banking77, 1, offset=10 + i)
                active.add(client.adapt_head("swapper", texts, labels).version)
        newest = max(active)
        # Every caller goes on until it has been answered by the newest version: the swaps were seen live.
        until(lambda: all(v and v[-1] == newest for v in seen.values()), "every caller saw the last swap")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    for versions in seen.values():
        assert set(versions) <= active, set(versions) - active
        assert versions == sorted(versions), "a caller saw a version older than one it had seen"
        assert versions[0] == first and versions[-1] == newest


def test_concurrent_commits_of_one_tenant_get_distinct_versions(  # type: ignore[no-untyped-def]
    cluster, postgres_server: PostgresServer, banking77: Data
) -> None:
    """Two replicas commit one tenant's trainings at the same moment. The moment is made, not hoped for:
    the test holds the tenant's row locked while both train, sees both commits wait (pg_stat_activity), then
    lets them go together. The commit's own row lock is what numbers them apart: without it both read the
    same next number and the second commit fails on the versions' primary key."""
    import psycopg

    _, (a, b, _) = cluster
    postgres_server.sql("INSERT INTO headswap_tenants (tenant) VALUES ('race')", "replicas")  # no version yet
    results: list[object] = []
    errors: list[str] = []

    def train(server: ServerProcess, offset: int) -> None:
        try:
            with Client(server.target, retries=0, timeout=120) as client:
                results.append(client.adapt_head("race", *examples(banking77, 5, offset=offset)))
        except HeadswapError as exc:
            errors.append(f"{exc.code.name}: {exc.details}")

    with psycopg.connect(postgres_server.dsn("replicas")) as holder:
        holder.execute("SELECT 1 FROM headswap_tenants WHERE tenant = 'race' FOR UPDATE")
        threads = [threading.Thread(target=train, args=(s, 5 + 5 * i)) for i, s in enumerate((a, b))]
        for t in threads:
            t.start()

        def waiting() -> int:
            return len(
                postgres_server.sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'replicas' AND wait_event_type = 'Lock'"
                )
            )

        until(lambda: waiting() == 2 or bool(errors), "both commits reach the store and wait")
        holder.rollback()  # both go at once
    for t in threads:
        t.join(120)
    assert errors == []
    versions = sorted(r.version for r in results)  # type: ignore[attr-defined]
    assert versions == [1, 2]
    with Client(a.target) as client:
        head = client.get_head("race")
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
    wait_for_version(b.target, "listener", newer)  # b's head is resident: only its listener brings this
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
        postgres_server.stop()  # returns once PostgreSQL is down (pg_ctl -w)
        with Client(a.target, retries=0) as client, pytest.raises(HeadswapError) as info:
            client.adapt_head("steady", *examples(banking77, 2, offset=20))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "unreachable" in info.value.details
        assert PASSWORD not in info.value.details
        during = calls[0]
        until(lambda: calls[0] > during + 20, "resident heads stopped serving while PostgreSQL was down")
        assert failures == []
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
    a = replica(backbone_dir, dsn, tmp_path / "a.log", "--auth", "keys", env=env)
    b = replica(backbone_dir, dsn, tmp_path / "b.log", "--auth", "keys", env=env)
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

            until(
                raises(lambda: on_b.classify("", ["card?"]), Unauthenticated),
                "b still accepts a key revoked on a",
            )
    finally:
        a.terminate()
        b.terminate()
