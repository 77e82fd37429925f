"""What an operator relies on: a real Prometheus scrape, promtool, the drain on SIGTERM (calls held in flight
for certain, and a grace period that runs out), structured logs."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError
from tests.gated_serve import Gate
from tests.helpers import HANG, REPO, ServerProcess, free_port, until

pytestmark = pytest.mark.integration

PROMETHEUS = REPO / ".cache" / "prometheus" / "usr" / "bin"
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]


def tool(name: str) -> Path:
    path = PROMETHEUS / name
    assert path.exists(), f"{path} missing: run scripts/install-prometheus (scripts/test does)"
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return str(reply.read().decode())


def local_server(backbone_dir: Path, tmp_path: Path, *flags: str, **options: Any) -> ServerProcess:
    """`headswap serve` with the store and log in `tmp_path`, no warm-up; `options` go to ServerProcess."""
    return ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(tmp_path / "store"), "--warmup-rounds", "0", *flags,
        log_path=tmp_path / "server.log", **options,
    )  # fmt: skip


def test_real_prometheus_scrape(
    backbone_dir: Path, banking77: dict[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    metrics_port = free_port()
    server = local_server(backbone_dir, tmp_path, metrics_port=metrics_port)
    prometheus = None
    try:
        server.wait_serving()
        embeds = 7
        with Client(server.target) as client:
            for i in range(embeds):
                client.embed([f"sentence {i}", "another one"])
            texts = [t for intent in INTENTS for t in banking77["train"][intent][:6]]
            labels = [intent for intent in INTENTS for _ in range(6)]
            client.adapt_head("metrics-tenant", texts, labels)
            client.classify("metrics-tenant", ["where is my card?"] * 3)
            with pytest.raises(HeadswapError):
                client.embed([""])
        # A refused call is counted as the interceptor unwinds, which can be just after the client has its
        # status: read until the last call is counted (seen once in CI), then check everything.
        last = 'headswap_requests_total{code="INVALID_ARGUMENT",rpc="Embed"} 1.0'
        give_up = time.monotonic() + 5
        exposition = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        while last not in exposition and time.monotonic() < give_up:
            time.sleep(0.05)
            exposition = http_get(f"http://127.0.0.1:{metrics_port}/metrics")

        # promtool's own lint of the exposition format and naming conventions.
        check = subprocess.run(
            [str(tool("promtool")), "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert 'headswap_requests_total{code="OK",rpc="Embed"} 7.0' in exposition
        assert 'headswap_requests_total{code="INVALID_ARGUMENT",rpc="Embed"} 1.0' in exposition
        assert 'headswap_training_runs_total{outcome="activated"} 1.0' in exposition
        assert "headswap_backbone_info{" in exposition and 'provider="CPUExecutionProvider"' in exposition
        assert "metrics-tenant" not in exposition, "tenant names must not become labels"
        for name in (
            "headswap_stage_duration_seconds_bucket",
            "headswap_batch_size_items_bucket",
            "headswap_batch_padding_ratio_bucket",
            "headswap_queue_depth_items",
            "headswap_embedding_cache_misses_total",
            "headswap_head_swaps_total",
            "headswap_heads_resident_bytes",
            "headswap_heads_allocated_bytes",
            "headswap_embedding_cache_entries",
            "headswap_training_duration_seconds_bucket",
        ):
            assert name in exposition, name

        # A real Prometheus server scrapes it and answers a PromQL query over its HTTP API.
        web_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: headswap\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        prometheus = subprocess.Popen(
            [
                str(tool("prometheus")),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        query = urllib.parse.urlencode({"query": 'sum(headswap_requests_total{rpc="Embed",code="OK"})'})
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline and value is None:
            try:
                reply = json.loads(http_get(f"http://127.0.0.1:{web_port}/api/v1/query?{query}"))
                if reply["status"] == "success" and reply["data"]["result"]:
                    value = float(reply["data"]["result"][0]["value"][1])
            except OSError:
                pass
            time.sleep(0.5)
        assert value == embeds, (value, (tmp_path / "prometheus.log").read_text()[-2000:])
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        assert server.terminate() == 0


@contextmanager
def gated_server(backbone_dir: Path, tmp_path: Path, *args: str) -> Iterator[tuple[ServerProcess, Gate, int]]:
    """The real server and backbone, its forward passes held while the gate is closed (tests/gated_serve.py);
    opened and stopped on the way out, whatever the test did."""
    gate, metrics_port = Gate(tmp_path / "gate"), free_port()
    server = local_server(
        backbone_dir, tmp_path, *args, metrics_port=metrics_port, module="tests.gated_serve", env=gate.env
    )
    try:
        yield server.wait_serving(), gate, metrics_port
    finally:
        gate.open()
        if server.proc.poll() is None:
            server.kill()


def gauge(metrics_port: int, name: str) -> float:
    for line in http_get(f"http://127.0.0.1:{metrics_port}/metrics").splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def callers(server: ServerProcess, texts: list[list[str]]) -> tuple[list[threading.Thread], list[object]]:
    results: list[object] = []
    lock = threading.Lock()

    def call(batch: list[str]) -> None:
        with Client(server.target, retries=0, timeout=HANG) as client:
            try:
                out: object = client.embed(batch).shape
            except HeadswapError as exc:
                out = exc.code
            with lock:
                results.append(out)

    threads = [threading.Thread(target=call, args=(batch,)) for batch in texts]
    for t in threads:
        t.start()
    return threads, results


def test_sigterm_drains_calls_in_flight(backbone_dir: Path, tmp_path: Path) -> None:
    """Calls in flight all finish, the ones held in the backbone and the ones queued behind them; a call after
    the signal gets UNAVAILABLE; the process exits 0. The calls are in flight for certain: the backbone is held
    until the test has seen every input in the server and sent the signal."""
    with gated_server(backbone_dir, tmp_path, "--grace-seconds", "600") as (server, gate, metrics_port):
        drain(server, gate, metrics_port)
    log = server.log()
    assert log.index("draining") < log.index("stopped")
    assert "grace period ran out" not in log


def drain(server: ServerProcess, gate: Gate, metrics_port: int) -> None:
    gate.close()
    texts = [[f"call {i} sentence {j} " + "with some more words " * 10 for j in range(48)] for i in range(8)]
    threads, results = callers(server, texts)
    # Every call is in the server: one batch held in the backbone, inputs queued behind it.
    until(lambda: gauge(metrics_port, "headswap_calls_in_flight") == 8, "the calls reached the server")
    until(
        lambda: bool(gate.held()) and gauge(metrics_port, "headswap_queue_depth_items") > 0, "inputs queued"
    )
    server.proc.send_signal(signal.SIGTERM)
    until(lambda: "draining" in server.log(), "the server began draining")
    with Client(server.target, retries=0, timeout=10) as late, pytest.raises(HeadswapError) as info:
        late.embed(["too late"])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert results == [] and server.proc.poll() is None, "nothing finishes while the backbone is held"
    gate.open()
    for t in threads:
        t.join(HANG)
    rc = server.proc.wait(HANG)
    server.terminate()
    assert results == [(48, 384)] * 8, results
    assert rc == 0


def test_sigterm_grace_period_running_out(backbone_dir: Path, tmp_path: Path) -> None:
    """Calls still in flight when the grace period ends are cut off: their callers get UNAVAILABLE (so a client
    retries elsewhere) without waiting for them, the log says which calls were cut, and the process exits 0."""
    with gated_server(backbone_dir, tmp_path, "--grace-seconds", "1") as (server, gate, metrics_port):
        cut_off(server, gate, metrics_port, tmp_path / "gate" / "closed")
    log = server.log()
    cut = [line for line in log.splitlines() if "grace period ran out" in line]
    assert len(cut) == 2 and all("WARNING" in line and "Embed CANCELLED" in line for line in cut), cut
    assert log.index("draining") < log.index("grace period ran out") < log.index("stopped")


def cut_off(server: ServerProcess, gate: Gate, metrics_port: int, closed: Path) -> None:
    gate.close()
    threads, results = callers(server, [["held in the backbone"] * 4, ["queued behind it"] * 4])
    until(lambda: gauge(metrics_port, "headswap_calls_in_flight") == 2, "the calls reached the server")
    until(lambda: bool(gate.held()), "a call reached the backbone")
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:  # the backbone is still held: the calls end because the grace period ran out
        t.join(HANG)
    assert results == [grpc.StatusCode.UNAVAILABLE] * 2, results
    assert closed.exists(), "the calls ended while the backbone was still held"
    gate.open()  # the forward pass in progress ends, and with it the process
    rc = server.proc.wait(HANG)
    server.terminate()
    assert rc == 0


def test_json_logs_carry_request_ids(backbone_dir: Path, tmp_path: Path) -> None:
    server = local_server(backbone_dir, tmp_path, "--log-format", "json")
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            from headswap.v1 import headswap_pb2 as pb
            from headswap.v1 import headswap_pb2_grpc as pb_grpc

            stub = pb_grpc.HeadswapServiceStub(channel)
            _, call = stub.Embed.with_call(
                pb.EmbedRequest(inputs=[pb.Input(text="hello")]), metadata=(("x-request-id", "req-123"),)
            )
            assert ("x-request-id", "req-123") in call.trailing_metadata()
            _, call = stub.Embed.with_call(pb.EmbedRequest(inputs=[pb.Input(text="again")]))
            generated = dict(call.trailing_metadata())["x-request-id"]
            with pytest.raises(grpc.RpcError):
                stub.Embed(pb.EmbedRequest(inputs=[]), metadata=(("x-request-id", "req-bad"),))
    finally:
        assert server.terminate() == 0
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert entries and len(entries) == len(server.log().strip().splitlines()), "every log line is JSON"
    calls = {e.get("request_id"): e for e in entries if e.get("rpc") == "Embed"}
    assert calls["req-123"]["code"] == "OK" and calls["req-123"]["duration_ms"] > 0
    assert generated in calls and len(generated) == 32
    assert calls["req-bad"]["code"] == "INVALID_ARGUMENT" and calls["req-bad"]["level"] == "WARNING"
    assert np.isfinite(calls[generated]["duration_ms"])
