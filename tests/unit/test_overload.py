"""Load shedding at the door (issue 23): while the event loop runs too far behind, data-plane calls are
refused before any work is done on them, and management calls still go through."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import BatchingConfig, ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.rpc.overload import LoopLag
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import in_process


def test_one_pause_sheds_nothing_a_run_of_late_ticks_does() -> None:
    lag = LoopLag(limit_s=0.05)
    for late in (0.0,) * 8 + (0.5,) + (0.0,) * 3:  # one pause (a full collection, one slow step)
        lag.observe(late)
        lag.check("Classify")  # nothing raised
    for _ in range(8):  # behind on every tick
        lag.observe(0.15)
    with pytest.raises(Exception, match="event loop runs"):
        lag.check("Classify")
    lag.check("AdaptHead")  # trainings and management calls always go through
    lag.check("ListHeads")
    lag.observe(0.0)
    lag.check("Classify")  # one tick on time: caught up, nothing raised


async def test_a_lagging_loop_sheds_data_calls_before_reading_them(tmp_path: Path) -> None:
    config = ServerConfig(warmup_rounds=0, home=tmp_path, batching=BatchingConfig(max_loop_lag_ms=50.0))
    async with in_process(config, backbone=fake_backbone(), store=MemoryStore()) as s:
        lag = s.server.rpc.interceptor.lag
        assert lag is not None and lag.limit_s == pytest.approx(0.05)
        await lag.stop()  # the test sets the lag itself
        async with AsyncClient(s.target, retries=0) as client:
            await client.adapt_head("t", ["red apple", "green leaf"] * 4, ["red", "green"] * 4)
            for _ in range(8):
                lag.observe(0.4)
            for call in (client.embed(["x"]), client.classify("t", ["red"])):
                with pytest.raises(HeadswapError) as info:
                    await call
                assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "event loop runs 400 ms behind" in info.value.details
            # Refused before the request is even decoded: bytes that are no Embed request get the same answer.
            channel = client._channel
            raw = channel.unary_unary("/headswap.v1.HeadswapService/Embed")
            with pytest.raises(grpc.aio.AioRpcError) as raw_info:
                await raw(b"\xff\xff not protobuf")
            assert raw_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert lag.shed == 3
            assert [h.tenant for h in await client.list_heads()] == ["t"]  # management goes through
            lag.observe(0.0)
            assert (await client.embed(["x"])).shape == (1, 16)
        metrics = s.server.metrics.registry.get_sample_value("headswap_event_loop_lag_seconds")
        assert metrics is not None


async def test_the_ticker_measures_a_blocked_loop() -> None:
    lag = LoopLag(limit_s=0.05, interval_s=0.005)
    seen: list[float] = []
    lag.observe = seen.append  # type: ignore[method-assign]  # every tick's lateness, as measured
    lag.start()
    await asyncio.sleep(0.02)
    ticks = len(seen)
    time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop is the point: the tick due meanwhile runs late
    while len(seen) == ticks:  # noqa: ASYNC110 - waiting for the ticker to run once more
        await asyncio.sleep(0)
    await lag.stop()
    assert seen[ticks] > 0.1
    assert max(seen[:ticks], default=0.0) < seen[ticks]


async def test_shedding_is_off_by_default(tmp_path: Path) -> None:
    async with in_process(ServerConfig(warmup_rounds=0, home=tmp_path), backbone=fake_backbone()) as s:
        assert s.server.rpc.interceptor.lag is None
