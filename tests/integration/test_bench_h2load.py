"""bench.h2load against a real server: the calls it counts are the server's, by code (h2load itself sees
only HTTP statuses), so a run of bad calls is errors, never throughput."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import h2load
from headswap.client import _codec
from headswap.server.testing import ServerProcess, free_port

EMBED = "/headswap.v1.HeadswapService/Embed"


@pytest.fixture(scope="module")
def free_server(backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The pipeline with the free encoder (bench/_free_serve.py), its /metrics on a port of its own."""
    work = tmp_path_factory.mktemp("h2load")
    metrics = free_port()
    proc = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(work / "store"),
        module="bench._free_serve",
        metrics_port=metrics,
        log_path=work / "server.log",
    )
    try:
        proc.wait_serving()
        yield proc.target, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        proc.terminate()


def test_h2load_is_installed() -> None:
    """scripts/test installs it (scripts/install-h2load): the benchmark's Classify ceiling needs it."""
    assert h2load.installed(), f"h2load is missing: run {h2load.INSTALL}"


def test_calls_that_went_well_are_counted_with_their_latencies(free_server: tuple[str, str]) -> None:
    target, metrics = free_server
    message = bytes(_codec.embed_request(["a short text"], None, "float32", "").SerializeToString())
    h2load.warm_up(target, EMBED, message, seconds=0.5, connections=2, streams=2)
    result = h2load.run_h2load(target, metrics, EMBED, message, 1.0, connections=2, streams=2)
    assert result.errors == {}
    assert result.calls > 50 and result.inputs == result.calls
    assert 0.9 <= result.seconds <= 1.5
    assert result.late <= 4  # cut when its time was up: one per stream at most
    # h2load logs every response it got; the server may have finished the few it cut.
    assert result.calls - 4 <= len(result.latencies_ms) <= result.calls + 4
    assert all(ms > 0 for ms in result.latencies_ms)
    assert h2load.calls_by_code(metrics, "Embed")["OK"] >= result.calls


def test_calls_the_server_refused_are_errors_not_throughput(free_server: tuple[str, str]) -> None:
    """Not protobuf: INVALID_ARGUMENT for every call, each an HTTP 200 that h2load alone would count."""
    target, metrics = free_server
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        h2load.run_h2load(target, metrics, EMBED, b"\xff\xff\xff", 0.5, connections=1, streams=2)
    assert h2load.calls_by_code(metrics, "Embed").get("INVALID_ARGUMENT", 0) > 0
