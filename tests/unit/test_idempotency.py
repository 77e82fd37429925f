"""AdaptHead's idempotency key (issue 26): a retry of a call that was done is answered with the first outcome
and stores nothing twice; the same key with other content is refused. In process, on the fake encoder and
the memory store; `tests/integration/test_idempotency.py` kills real servers at each commit point and
retries on another replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import LimitsConfig, ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process

TEXTS = [f"{c} w{i} x{i % 4}" for c in ("red", "blue", "green") for i in range(6)]
LABELS = [t.split()[0] for t in TEXTS]
MORE = ["red q1", "blue q2", "green q3"]
MORE_LABELS = ["red", "blue", "green"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcess]:
    config = ServerConfig(warmup_rounds=0, home=tmp_path, limits=LimitsConfig(max_examples=500))
    async with in_process(config, backbone=fake_backbone(), store=MemoryStore()) as running:
        yield running


@pytest.fixture
async def client(server: InProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.target, retries=0, timeout=30) as c:
        yield c


def runs(s: InProcess, outcome: str) -> float:
    value = s.server.metrics.registry.get_sample_value("headswap_training_runs_total", {"outcome": outcome})
    return value or 0.0


async def test_a_retry_gets_the_first_outcome_and_trains_nothing(
    server: InProcess, client: AsyncClient
) -> None:
    first = await client.adapt_head("t", TEXTS, LABELS, request_id="call-1")
    again = await client.adapt_head("t", TEXTS, LABELS, request_id="call-1")
    assert again == first  # the same version, counts and gate checks, as first answered
    assert first.version == 1 and first.embedded == len(TEXTS) and first.stored_examples == len(TEXTS)
    head = await client.get_head("t")
    assert [v.version for v in head.versions] == [1] and head.example_count == len(TEXTS)
    assert (runs(server, "activated"), runs(server, "replayed")) == (1, 1)
    # Another key is another call: it adds its examples and trains.
    second = await client.adapt_head("t", MORE, MORE_LABELS, request_id="call-2")
    assert second.version == 2 and second.stored_examples == len(TEXTS) + len(MORE)


async def test_the_same_key_with_other_content_is_refused(client: AsyncClient) -> None:
    await client.adapt_head("t", TEXTS, LABELS, request_id="call-1")
    for changed in (
        {"texts": [*TEXTS[:-1], "green other"], "labels": LABELS},
        {"texts": TEXTS, "labels": [*LABELS[:-1], "red"]},
        {"texts": TEXTS, "labels": LABELS, "kind": "mlp"},
        {"texts": TEXTS, "labels": LABELS, "replace": True},
    ):
        texts, labels = changed.pop("texts"), changed.pop("labels")
        with pytest.raises(HeadswapError) as info:
            await client.adapt_head("t", texts, labels, request_id="call-1", **changed)  # type: ignore[arg-type]
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, changed
        assert "request_id 'call-1' was already used" in info.value.details
    assert [v.version for v in (await client.get_head("t")).versions] == [1]


async def test_an_upload_in_several_calls_is_stored_once_when_sent_again(
    server: InProcess, client: AsyncClient
) -> None:
    texts = [f"{t} {'pad ' * 20}" for t in TEXTS]
    first = await client.adapt_head("t", texts, LABELS, request_id="upload", chunk_bytes=600)
    again = await client.adapt_head("t", texts, LABELS, request_id="upload", chunk_bytes=600)
    assert again.version == first.version == 1 and again.stored_examples == len(TEXTS)
    assert (await client.get_head("t")).example_count == len(TEXTS)
    assert runs(server, "replayed") == 1  # the training call; the store_only calls train nothing


async def test_a_retry_while_the_first_call_still_runs_waits_for_its_outcome(client: AsyncClient) -> None:
    """The retry waits for the tenant's lock, which the first call's work holds, and then finds its record."""
    a, b = await asyncio.gather(
        client.adapt_head("t", TEXTS, LABELS, request_id="twice"),
        client.adapt_head("t", TEXTS, LABELS, request_id="twice"),
    )
    assert a == b and a.version == 1
    head = await client.get_head("t")
    assert [v.version for v in head.versions] == [1] and head.example_count == len(TEXTS)


async def test_a_retry_of_a_version_deleted_since_is_refused(client: AsyncClient) -> None:
    await client.adapt_head("t", TEXTS, LABELS, request_id="v1")
    await client.adapt_head("t", MORE, MORE_LABELS, request_id="v2")
    await client.delete_head_version("t", 1)
    with pytest.raises(HeadswapError) as info:
        await client.adapt_head("t", TEXTS, LABELS, request_id="v1")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained version 1" in info.value.details and "deleted since" in info.value.details
    assert [v.version for v in (await client.get_head("t")).versions] == [2]


async def test_delete_head_forgets_the_keys(server: InProcess, client: AsyncClient) -> None:
    await client.adapt_head("t", TEXTS, LABELS, request_id="k")
    await client.delete_head("t")
    result = await client.adapt_head("t", TEXTS, LABELS, request_id="k")
    assert result.version == 1 and runs(server, "replayed") == 0 and runs(server, "activated") == 2


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "ünï"])
async def test_a_malformed_key_is_refused(client: AsyncClient, bad: str) -> None:
    with pytest.raises(HeadswapError) as info:
        await client.adapt_head("t", TEXTS, LABELS, request_id=bad)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "idempotency key" in info.value.details


async def test_calls_without_a_key_train_each_time(client: AsyncClient) -> None:
    await client.adapt_head("t", TEXTS, LABELS, request_id="")
    second = await client.adapt_head("t", [], [], request_id="")
    assert second.version == 2
