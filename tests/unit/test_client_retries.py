"""The client retries UNAVAILABLE, and a CANCELLED it did not ask for (a stopping server cancels the calls it
received but had not started), only. A small fake servicer on real gRPC over loopback stands in for
the server here; the integration tests use the real one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from headswap.client import AsyncClient, Client, HeadswapError
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc


class FlakyServicer(pb_grpc.HeadswapServiceServicer):
    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.calls = 0
        self.delay = 0.0

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.failures:
            context.abort(self.failures.pop(0), "flaky")
        n = len(request.inputs)
        data = np.arange(n * 4, dtype="<f4").reshape(n, 4)
        return pb.EmbedResponse(
            embeddings=pb.Tensor(dtype=pb.ELEMENT_TYPE_FLOAT32, shape=[n, 4], data=data.tobytes()),
            truncated=[False] * n,
        )


@pytest.fixture
def fake() -> Iterator[tuple[str, FlakyServicer]]:
    servicer = FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_HeadswapServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_retries_unavailable_then_succeeds(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with Client(target, retries=3, backoff=0.01) as client:
        out = client.embed(["a", "b"])
    assert servicer.calls == 3
    assert out.shape == (2, 4) and out.dtype == np.float32 and out[1, 0] == 4.0


def test_retries_a_cancel_that_came_from_the_server(fake: tuple[str, FlakyServicer]) -> None:
    # Seen in CI: one Embed in ~50 during a restart came back CANCELLED from the stopping server.
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.CANCELLED]
    with Client(target, retries=3, backoff=0.01) as client:
        assert client.embed(["a"]).shape == (1, 4)
    assert servicer.calls == 2


def test_gives_up_after_retries(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 5
    with Client(target, retries=2, backoff=0.01) as client, pytest.raises(HeadswapError) as info:
        client.embed(["a"])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL])
def test_no_retry_on_other_codes(fake: tuple[str, FlakyServicer], code: grpc.StatusCode) -> None:
    target, servicer = fake
    servicer.failures = [code]
    with Client(target, retries=3, backoff=0.01) as client, pytest.raises(HeadswapError) as info:
        client.embed(["a"])
    assert info.value.code == code and servicer.calls == 1


async def test_async_client_retries(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncClient(target, retries=1, backoff=0.01) as client:
        out = await client.embed(["a"])
    assert out.shape == (1, 4) and servicer.calls == 2


def test_deadline_is_applied(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    servicer.delay = 1.0
    with Client(target, timeout=0.2, retries=0) as client, pytest.raises(HeadswapError) as info:
        client.embed(["a"])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_single_string_is_refused() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError, match="not a single string"):
        client.embed("oops")  # type: ignore[arg-type]
