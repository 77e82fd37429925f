"""bench.gpu's accounting of the server's CPU time (the free-encoder ceiling on a shared machine)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from bench._gpu_free import tree_cpu_seconds, with_cpu
from bench.load import LoadResult

BUSY = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_cpu_of_a_process_and_the_processes_below_it() -> None:
    """A parent that waits on a child busy for 0.6 s of CPU: the tree used at least that, the parent alone
    almost none (a server's workers are its children)."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BUSY.format(s=0.6)!r}])\nimport time; time.sleep(30)",
        ]
    )
    try:
        import time

        deadline = time.monotonic() + 60
        while tree_cpu_seconds(parent.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds(parent.pid) >= 0.6
    finally:
        parent.kill()
        parent.wait()
    assert tree_cpu_seconds(parent.pid) == 0.0  # gone: nothing to count, no error


def test_with_cpu_divides_what_was_answered_by_the_servers_cpu() -> None:
    server = subprocess.Popen([sys.executable, "-c", BUSY.format(s=0.5) + "import time; time.sleep(30)"])
    try:

        def load() -> LoadResult:
            import time

            while tree_cpu_seconds(server.pid) < 0.45:
                time.sleep(0.02)
            return LoadResult(calls=100, inputs=1000, seconds=1.0)

        out = with_cpu(server.pid, load)
    finally:
        server.kill()
        server.wait()
    assert 0.3 <= out["server_cpu_s"] <= 1.0
    expected = 100 / out["server_cpu_s"]
    assert abs(out["calls_per_cpu_s"] - expected) <= 0.05 * expected
    assert abs(out["inputs_per_cpu_s"] - 10 * expected) <= 0.5 * expected


def test_the_echo_server_answers_classify_with_its_fixed_reply() -> None:
    """bench.grpc_floor's floor: a real grpc.aio server that the load tool and the client can call."""
    from bench.grpc_floor import echo_server
    from headswap.client import Client
    from headswap.server.testing import free_port

    port = free_port()
    proc = echo_server(port)
    try:
        with Client(f"127.0.0.1:{port}", retries=0, timeout=30) as client:
            (prediction,) = client.classify("bench", ["any text"])
        assert prediction.labels[0].label == "a" and prediction.version == 1
    finally:
        proc.kill()
        proc.wait()


def test_the_free_runs_loads_open_enough_connections_for_two_workers() -> None:
    """Workers sharing a port are handed connections, not calls (SO_REUSEPORT): the free run's loads must
    open enough of them that two workers both get some. Over one connection, its "2 workers" measured one."""
    from bench._gpu_free import CONNECTIONS, _embed_spec
    from bench._gpu_serving import classify_saturation

    specs = [_embed_spec("localhost:1", ["a"], size, 1.0) for size in (256, 32)]
    specs.append(classify_saturation("localhost:1", ["a"], 1.0, CONNECTIONS))
    assert all(spec.connections == CONNECTIONS for spec in specs)
    # The kernel picks a worker per connection by hash: all on one of two is 2 * 0.5**n likely.
    assert 2 * 0.5**CONNECTIONS <= 0.01
    assert all(spec.concurrency >= CONNECTIONS for spec in specs)  # every connection carries calls


def test_the_free_table_takes_medians_over_rounds_and_shows_every_figure_measured() -> None:
    """Rounds are summed up by their medians, h2load's figure and the latencies at fixed rates included,
    and a figure one system lacks (a baseline without h2load) leaves its row out instead of failing."""
    from bench._gpu_free import _median_rounds
    from bench._gpu_report import report_free

    def run(calls: float, h2: float, p99: float) -> dict[str, Any]:
        fig = {"inputs_per_s": 10.0, "inputs_per_cpu_s": 5.0}
        return {
            "embed_r256": fig,
            "embed_r32": fig,
            "classify_1": {"calls_per_s": calls, "calls_per_cpu_s": calls / 2},
            "classify_1_h2load": {"calls_per_s": h2, "calls_per_cpu_s": h2 / 2},
            "classify_at_1000": {"p50_ms": 2.0, "p99_ms": p99},
        }

    new = _median_rounds([run(1000, 2000, 5.0), run(1200, 2400, 9.0), run(1100, 2200, 7.0)])
    assert new["classify_1"] == 1100 and new["classify_1_h2load"] == 2200
    assert new["classify_1_h2load_per_cpu"] == 1100
    assert new["classify_at_1000_p50"] == 2.0 and new["classify_at_1000_p99"] == 7.0
    old = _median_rounds([{k: v for k, v in run(500, 0, 4.0).items() if k != "classify_1_h2load"}])
    assert "classify_1_h2load" not in old
    table = report_free({"free_summary": {"baseline": old, "this commit": new}})
    assert "| Classify, one text per call: calls/s | 500 | 1,100 | 2.20× |" in table
    assert "from h2load" not in table  # the baseline has no such figure: no row
    assert "| Classify at 1000 calls/s (open loop): p99, ms | 4.00 | 7.00 | — |" in table
