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
        self.adapt_ids: list[str] = []  # AdaptHead's request ids, one per attempt

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

    def AdaptHead(
        self, request: pb.AdaptHeadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AdaptHeadResponse]:
        self.adapt_ids.append(request.request_id)
        yield pb.AdaptHeadResponse(progress=pb.AdaptHeadProgress(stage="embedding", done=0, total=1))
        if self.failures:  # mid-stream, as a server that stops or loses its store would
            context.abort(self.failures.pop(0), "flaky")
        version = pb.HeadVersion(version=len(self.adapt_ids), labels=["a", "b"])
        yield pb.AdaptHeadResponse(
            result=pb.AdaptHeadResult(tenant=request.tenant, head=version, activated=True, active_version=1)
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


def test_adapt_head_is_retried_with_its_request_id(fake: tuple[str, FlakyServicer]) -> None:
    """AdaptHead carries an idempotency key (a new one per call by default), and every retry sends the same:
    the server answers a retry of a committed call with its first outcome (tests/unit/test_idempotency.py)."""
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with Client(target, retries=3, backoff=0.01) as client:
        result = client.adapt_head("t", ["x", "y"], ["a", "b"])
        assert result.version == 3 and len(servicer.adapt_ids) == 3
        first = servicer.adapt_ids[0]
        assert len(first) == 32 and set(servicer.adapt_ids) == {first}
        client.adapt_head("t", ["x", "y"], ["a", "b"], request_id="order-17")
        assert servicer.adapt_ids[-1] == "order-17" and first != servicer.adapt_ids[3]
        # request_id="" sends none: the call cannot be told from a new one, so it is not retried.
        servicer.failures = [grpc.StatusCode.UNAVAILABLE]
        with pytest.raises(HeadswapError) as info:
            client.adapt_head("t", ["x", "y"], ["a", "b"], request_id="")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and servicer.adapt_ids[-1] == ""
        # Other codes are final, as for every call.
        calls = len(servicer.adapt_ids)
        servicer.failures = [grpc.StatusCode.FAILED_PRECONDITION]
        with pytest.raises(HeadswapError):
            client.adapt_head("t", ["x", "y"], ["a", "b"])
        assert len(servicer.adapt_ids) == calls + 1


async def test_async_client_retries_adapt_head(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncClient(target, retries=3, backoff=0.01) as client:
        result = await client.adapt_head("t", ["x", "y"], ["a", "b"], request_id="r-1")
    assert result.version == 2 and servicer.adapt_ids == ["r-1", "r-1"]


def test_a_chunked_upload_gives_each_call_its_own_request_id(fake: tuple[str, FlakyServicer]) -> None:
    target, servicer = fake
    with Client(target, retries=3, backoff=0.01) as client:
        client.adapt_head(
            "t", ["x" * 100, "y" * 100, "z" * 100], ["a", "b", "a"], chunk_bytes=150, request_id="up"
        )
    assert servicer.adapt_ids == ["up/1", "up/2", "up/3"]
