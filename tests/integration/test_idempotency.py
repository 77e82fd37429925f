"""AdaptHead retried safely (issue 26), with real servers, the real backbone and a real PostgreSQL: a server
killed at each step of a commit, the client's automatic retry landing on a restarted server or on another
replica, and a retry that waits through a PostgreSQL restart; in every case the examples are stored once and
one version is trained."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from headswap.client import AdaptResult, Client, HeadswapError
from headswap.server.store.faults import POINTS
from headswap.server.testing_postgres import PostgresServer
from tests.helpers import HANG, ServerProcess, free_port, until
from tests.integration.test_hardening import Data, examples

pytestmark = pytest.mark.integration


def serve(
    backbone_dir: Path,
    store: str,
    log: Path,
    port: int,
    env: dict[str, str] | None = None,
    metrics_port: int = 0,
) -> ServerProcess:
    args = ["--backbone", str(backbone_dir), "--store", store, "--warmup-rounds", "0", "--port", str(port)]
    if store.startswith("postgresql://"):
        args.append("--store-migrate")
    return ServerProcess(*args, log_path=log, env=env, metrics_port=metrics_port)


def refused_adapts(metrics_port: int) -> float:
    """AdaptHead calls the server answered UNAVAILABLE, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("headswap_requests_total{")
        and 'rpc="AdaptHead"' in line
        and 'code="UNAVAILABLE"' in line
    )


def in_background(call: Callable[[], AdaptResult]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())
        except HeadswapError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_commit_step_then_the_clients_retry_stores_once(
    backbone_dir: Path, banking77: Data, tmp_path: Path, point: str
) -> None:
    """The server dies at `point` of the commit; the client, retrying on its own, reaches the server started
    again on the same store and port. Before the commit point the retry trains (nothing was stored); after
    it, the retry is answered with the committed version. Either way: one version, each example once."""
    store, port = str(tmp_path / "store"), free_port()
    texts, labels = examples(banking77, 5)
    crashing = serve(backbone_dir, store, tmp_path / "a.log", port, {"HEADSWAP_TEST_CRASH_AT": point})
    crashing.wait_serving()
    with Client(crashing.target, backoff=0.2) as client:
        thread, out = in_background(
            lambda: client.adapt_head("t", texts, labels, request_id="once", timeout=HANG)
        )
        assert crashing.proc.wait(HANG) == 137, f"did not crash at {point}:\n{crashing.log()}"
        crashing.kill()
        again = serve(backbone_dir, store, tmp_path / "b.log", port).wait_serving()
        try:
            thread.join(HANG)
            assert len(out) == 1 and isinstance(out[0], AdaptResult), out
            assert out[0].version == 1 and out[0].stored_examples == len(texts)
            head = client.get_head("t")
            assert [v.version for v in head.versions] == [1] and head.example_count == len(texts)
            replayed = "was done before" in again.log()
            assert replayed == (point == "state-written"), again.log()
        finally:
            assert again.terminate() == 0


def test_a_retry_on_another_replica_and_through_a_postgres_restart_stores_once(
    backbone_dir: Path, banking77: Data, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Replica A commits a training to PostgreSQL and dies before answering. The client's retries go to
    replica B (one channel over both addresses); PostgreSQL is stopped before B sees the retry and started
    again only once B has refused it: the client keeps retrying through the restart, and B answers with A's
    version. Then an upload in several calls is retried as a whole: nothing is stored twice."""
    dsn = postgres_server.create_database("idempotency")
    texts, labels = examples(banking77, 5)
    a = serve(backbone_dir, dsn, tmp_path / "a.log", free_port(), {"HEADSWAP_TEST_CRASH_AT": "state-written"})
    b_metrics = free_port()
    b = serve(backbone_dir, dsn, tmp_path / "b.log", free_port(), metrics_port=b_metrics)
    try:
        a.wait_serving()
        b.wait_serving()
        # The first attempt, on A: committed, then A is gone before it answers.
        with Client(a.target, retries=0) as client, pytest.raises(HeadswapError) as info:
            client.adapt_head("t", texts, labels, request_id="r-1")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and a.proc.wait(HANG) == 137
        postgres_server.stop()
        refusals = refused_adapts(b_metrics)
        both = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"  # A first; A is down, so B
        with Client(both, backoff=0.2) as client:
            thread, out = in_background(
                lambda: client.adapt_head("t", texts, labels, request_id="r-1", timeout=HANG)
            )
            try:
                until(
                    lambda: refused_adapts(b_metrics) > refusals,
                    "B refused the retry while the store was down",
                )
                assert thread.is_alive(), "the retry ended while PostgreSQL was down"
            finally:
                postgres_server.start()
            thread.join(HANG)
        assert len(out) == 1 and isinstance(out[0], AdaptResult), out
        assert out[0].version == 1 and out[0].stored_examples == len(texts)
        assert "AdaptHead request_id r-1 was done before (version 1)" in b.log()
        with Client(b.target) as client:
            head = client.get_head("t")
            assert [v.version for v in head.versions] == [1] and head.example_count == len(texts)
            # An upload in several calls, sent twice whole (as a caller that lost track would): stored once.
            more_texts, more_labels = examples(banking77, 4, offset=5)
            first = client.adapt_head("t", more_texts, more_labels, request_id="up", chunk_bytes=400)
            second = client.adapt_head("t", more_texts, more_labels, request_id="up", chunk_bytes=400)
            assert first.version == second.version == 2
            assert client.get_head("t").example_count == len(texts) + len(more_texts)
    finally:
        for s in (a, b):
            s.kill()
