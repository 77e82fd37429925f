"""What an operator relies on: a real Prometheus scrape, promtool, the drain on SIGTERM, structured logs."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError
from tests.helpers import REPO, ServerProcess, free_port

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


def test_real_prometheus_scrape(
    backbone_dir: Path, banking77: dict[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    metrics_port = free_port()
    server = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(tmp_path / "store"),
        "--warmup-rounds",
        "0",
        log_path=tmp_path / "server.log",
        metrics_port=metrics_port,
    )
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


def test_sigterm_during_a_burst(backbone_dir: Path, tmp_path: Path) -> None:
    """In-flight calls all finish; calls after the signal get UNAVAILABLE; the process exits 0."""
    server = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(tmp_path / "store"),
        "--warmup-rounds",
        "0",
        "--grace-seconds",
        "30",
        log_path=tmp_path / "server.log",
    )
    server.wait_serving()
    results: list[object] = []
    lock = threading.Lock()
    started = threading.Barrier(9)

    def caller(i: int) -> None:
        texts = [f"call {i} sentence {j} " + "with some more words " * 10 for j in range(48)]
        with Client(server.target, retries=0, timeout=60) as client:
            started.wait()
            try:
                out = client.embed(texts)
                with lock:
                    results.append(out.shape)
            except HeadswapError as exc:
                with lock:
                    results.append(exc.code)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)  # the burst is in the server: queued and running
    server.proc.send_signal(15)
    time.sleep(0.2)
    with Client(server.target, retries=0, timeout=5) as late:
        with pytest.raises(HeadswapError) as info:
            late.embed(["too late"])
    for t in threads:
        t.join(60)
    rc = server.proc.wait(60)
    server.terminate()
    assert results == [(48, 384)] * 8, results
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert rc == 0
    log = server.log()
    assert log.index("draining") < log.index("stopped")


def test_json_logs_carry_request_ids(backbone_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(tmp_path / "store"),
        "--warmup-rounds",
        "0",
        "--log-format",
        "json",
        log_path=tmp_path / "server.log",
    )
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
