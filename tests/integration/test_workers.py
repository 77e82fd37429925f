"""`headswap serve --workers 2`: two server processes on one port, one local store, one /metrics.

The kernel spreads connections over the workers (SO_REUSEPORT), so the test opens connections until it holds
one served by each (it learns which from the JSON access log, by request id), then checks that a swap made
through one worker reaches the other, that the supervisor's /metrics carries both, that a worker killed
with SIGKILL is started again, and that SIGTERM drains both and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.client import Client
from headswap.client.errors import NotFound
from tests.helpers import ServerProcess, free_port, raises

pytestmark = pytest.mark.integration


class OneConnection(Client):
    """A client with a TCP connection of its own (gRPC shares one between equal channels by default), whose
    calls carry a request id the test chooses."""

    @staticmethod
    def _connect(target: str, credentials: Any, options: list[tuple[str, Any]]) -> Any:
        return grpc.insecure_channel(target, options=[*options, ("grpc.use_local_subchannel_pool", 1)])

    def tag(self, request_id: str) -> OneConnection:
        self._metadata = (("x-request-id", request_id),)
        return self


def log_entries(proc: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("workers")
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--precision", "fp32", "--workers", "2", "--log-format", "json",
        "--cpu-policy", "batch", metrics_port=free_port(), log_path=work / "server.log",
    )  # fmt: skip
    serving = lambda: sum(e.get("msg", "").startswith("SERVING") for e in log_entries(proc)) >= 2  # noqa: E731
    wait_for(serving, "both workers to serve", 300)
    yield proc
    if proc.proc.poll() is None:
        proc.terminate()


def worker_of(proc: ServerProcess, request_id: str) -> int:
    for entry in log_entries(proc):
        if entry.get("request_id") == request_id and entry.get("logger") == "headswap.access":
            return int(entry["worker"])
    raise LookupError(request_id)


def one_per_worker(proc: ServerProcess) -> dict[int, OneConnection]:
    found: dict[int, OneConnection] = {}
    for k in range(64):
        client = OneConnection(proc.target)
        client.tag(f"probe-{os.getpid()}-{k}-{time.monotonic_ns()}").embed(["which worker?"])
        request_id = dict(client._metadata)["x-request-id"]
        wait_for(lambda r=request_id: _logged(proc, r), "the probe's access log line", 10)
        worker = worker_of(proc, request_id)
        if worker in found:
            client.close()
        else:
            found[worker] = client
        if len(found) == 2:
            return found
    raise AssertionError("64 connections all went to one worker")


def _logged(proc: ServerProcess, request_id: str) -> bool:
    try:
        worker_of(proc, request_id)
        return True
    except LookupError:
        return False


def test_a_swap_through_one_worker_reaches_the_other(workers: ServerProcess) -> None:
    clients = one_per_worker(workers)
    a, b = clients[0].tag("a"), clients[1].tag("b")
    texts = [
        "my card has not arrived",
        "where is my new card",
        "what is the euro rate",
        "exchange rate today",
    ]
    labels = ["card", "card", "fx", "fx"]
    first = a.adapt_head("shared", texts * 3, labels * 3, validation_fraction=0)
    wait_for(lambda: b.classify("shared", ["card?"])[0].version == first.version, "worker 1 to serve v1", 10)
    second = a.adapt_head("shared", texts * 3, labels * 3, validation_fraction=0, force_activate=True)
    wait_for(lambda: b.classify("shared", ["card?"])[0].version == second.version, "worker 1 to serve v2", 10)
    b.activate_head_version("shared", first.version)
    wait_for(lambda: a.classify("shared", ["card?"])[0].version == first.version, "worker 0 to roll back", 10)
    a.delete_head("shared")

    wait_for(
        raises(lambda: b.classify("shared", ["card?"]), NotFound), "worker 1 to refuse the deleted tenant", 10
    )
    for client in clients.values():
        client.close()


def test_one_metrics_endpoint_for_every_worker(workers: ServerProcess) -> None:
    clients = one_per_worker(workers)
    for client in clients.values():
        client.embed(["count me"])
        client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{workers.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["headswap_requests"].samples if s.name == "headswap_requests_total"]
    embeds = {s.labels["worker"] for s in requests if s.labels["rpc"] == "Embed" and s.value > 0}
    assert embeds == {"0", "1"}
    assert {s.labels["worker"] for s in families["headswap_backbone_info"].samples} == {"0", "1"}


def test_every_thread_of_the_supervisor_and_the_workers_runs_under_the_policy_asked_for(
    workers: ServerProcess,
) -> None:
    """`--cpu-policy batch` (SCHED_BATCH, policy 3 in /proc's stat): set before the workers and threads were
    made, so every one of them has it, gRPC's and ONNX Runtime's threads too."""
    servings = [e["msg"] for e in log_entries(workers) if e.get("msg", "").startswith("SERVING")]
    assert len(servings) >= 2 and all("cpu policy: batch" in msg for msg in servings), servings
    children = Path(f"/proc/{workers.pid}/task/{workers.pid}/children").read_text().split()
    policies = {}
    for pid in [str(workers.pid), *children]:
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            policies[f"{pid}/{task.name}"] = int(stat.rsplit(")", 1)[1].split()[38])  # field 41: policy
    assert len(policies) > 10 and set(policies.values()) == {3}, policies


def test_a_killed_worker_is_started_again_and_sigterm_drains_both(workers: ServerProcess) -> None:
    children = Path(f"/proc/{workers.pid}/task/{workers.pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[1]), signal.SIGKILL)
    serving = lambda: sum(e.get("msg", "").startswith("SERVING") for e in log_entries(workers)) >= 3  # noqa: E731
    wait_for(serving, "the killed worker to serve again", 300)
    assert any("exited with" in e.get("msg", "") for e in log_entries(workers))
    with Client(workers.target) as client:  # the port still answers
        assert client.embed(["still here"]).shape == (1, 384)
    assert workers.terminate() == 0
    drained = [e for e in log_entries(workers) if e.get("msg") == "stopped"]
    assert len(drained) >= 3  # both workers and the supervisor
