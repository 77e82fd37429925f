"""The batcher's behaviour, with a small fake backbone that records every forward pass."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from headswap.server.domain import Input
from headswap.server.errors import InvalidArgument, ResourceExhausted
from headswap.server.inference.batcher import Batcher
from headswap.server.inference.forward import BatchStats
from headswap.server.inference.protocols import Backbone, Prepared
from headswap.server.manifest import BackboneManifest
from tests.helpers import batch_policy, eventually


class FakeBackbone:
    """Token ids are the text's code points; an 'embedding' is (first id, length, call number). It is the
    preprocessor and the encoder at once, and records every forward pass."""

    dim = 3
    input_kind = "text"
    provider = "fake"
    precision = "fp32"

    def __init__(self) -> None:
        self.batches: list[list[int]] = []  # first id of each item per forward pass
        self.spare_core: list[bool] = []  # per forward pass: whether the server was refusing calls
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def prepare(self, inputs: list[Input]) -> list[Prepared]:
        ids = [np.array([ord(c) for c in str(item.content)], dtype=np.int64) for item in inputs]
        return [Prepared(x, len(x), len(x)) for x in ids]

    def collate(self, items: list[Prepared]) -> dict[str, object]:
        return {"ids": [item.payload for item in items]}

    def run(self, feeds: dict[str, list[np.ndarray]], spare_core: bool = False) -> np.ndarray:
        self.spare_core.append(spare_core)
        self.entered.set()
        self.gate.wait(10)
        ids = feeds["ids"]
        self.batches.append([int(x[0]) for x in ids])
        return np.array([[x[0], len(x), len(self.batches)] for x in ids], dtype=np.float32)


class FakeHeads:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def apply(self, embeddings: np.ndarray, slots: list[int]) -> list[np.ndarray]:
        self.calls.append(list(slots))
        return [np.array([slot, e[0]], dtype=np.float32) for e, slot in zip(embeddings, slots, strict=True)]


class TextBatcher:
    """The batcher under test, called with strings as the old tests do."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    async def submit(self, texts: list[str], slot: int | None = None):  # type: ignore[no-untyped-def]
        return await self.batcher.submit([Input(text=t) for t in texts], slot=slot)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.batcher, name)


@pytest.fixture
def pools():  # type: ignore[no-untyped-def]
    tok, bb = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    yield tok, bb
    tok.shutdown(wait=False)
    bb.shutdown(wait=False)


def make(pools, **policy: float) -> tuple[TextBatcher, FakeBackbone, FakeHeads, list[BatchStats]]:  # type: ignore[no-untyped-def]
    backbone, heads, stats = FakeBackbone(), FakeHeads(), []
    manifest = BackboneManifest("fake", 3, "none", "l2", 64, "text", "0" * 64)
    batcher = Batcher(
        Backbone(manifest, backbone, backbone),
        batch_policy(**policy),
        *pools,
        heads=heads,
        on_batch=stats.append,
        prepare_workers=2,
    )  # type: ignore[arg-type]
    batcher.start()
    return TextBatcher(batcher), backbone, heads, stats


async def test_batch_mixes_requests_and_tenants(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, heads, stats = make(pools, max_wait_s=0.05)
    # While the backbone is busy with a first call, three calls from two tenants and an Embed queue up.
    backbone.gate.clear()
    blocker = asyncio.create_task(batcher.submit(["zz"]))
    await asyncio.get_running_loop().run_in_executor(None, backbone.entered.wait, 5)
    calls = [
        batcher.submit(["aa", "ab"]),
        batcher.submit(["ba"], slot=7),
        batcher.submit(["ca", "cb"], slot=9),
    ]
    tasks = [asyncio.create_task(c) for c in calls]
    await asyncio.sleep(0.1)
    backbone.gate.set()
    await blocker
    results = await asyncio.gather(*tasks)
    await batcher.stop()
    assert len(backbone.batches) == 2 and stats[1].items == 5 and stats[1].requests == 3
    assert heads.calls == [[7, 9, 9]]  # both tenants' heads in one grouped call
    assert [r[0] for r in results[0].rows] == [ord("a"), ord("a")]
    assert [list(r) for r in results[1].rows] == [[7, ord("b")]]
    assert [list(r) for r in results[2].rows] == [[9, ord("c")], [9, ord("c")]]


async def test_replies_go_to_the_right_callers_in_order(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, _ = make(pools, max_batch_items=7, max_wait_s=0.001)
    rng = np.random.default_rng(0)
    requests = [
        [chr(65 + (r % 50)) + "x" * int(rng.integers(0, 30)) for _ in range(int(rng.integers(1, 12)))]
        for r in range(60)
    ]
    results = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
    await batcher.stop()
    assert len(backbone.batches) > 8 and max(len(b) for b in backbone.batches) <= 7
    for texts, result in zip(requests, results, strict=True):
        assert [(int(r[0]), int(r[1])) for r in result.rows] == [(ord(t[0]), len(t)) for t in texts]


async def test_groups_by_length_within_the_token_budget(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, stats = make(pools, max_batch_cost=40, max_wait_s=0.05)
    backbone.gate.clear()
    blocker = asyncio.create_task(batcher.submit(["z"]))
    await asyncio.get_running_loop().run_in_executor(None, backbone.entered.wait, 5)
    texts = ["a" * 2, "b" * 20, "c" * 2, "d" * 20, "e" * 3, "f" * 19]
    # One request, so that all six wait together whatever order the preprocessing pool finishes in (six
    # requests could reach a full budget, and a batch, before the last of them is prepared).
    pending = [asyncio.create_task(batcher.submit(texts))]
    await asyncio.sleep(0.1)
    backbone.gate.set()
    await asyncio.gather(blocker, *pending)
    await batcher.stop()
    batches = [sorted(chr(x) for x in b) for b in backbone.batches[1:]]
    assert sorted(map(tuple, batches)) == [("a", "c", "e"), ("b", "d"), ("f",)]
    assert all(s.padded_cost <= 40 for s in stats)


async def test_padding_cap_keeps_far_lengths_apart(pools) -> None:  # type: ignore[no-untyped-def]
    # Without a cap the budget lets a 2-token and a 10-token text share a pass (20 padded tokens, 12 real:
    # 40% padding); with a cap of 25% the short ones go together and the long one waits for its own.
    for cap, expected in ((1.0, [("a", "b", "c", "d")]), (0.25, [("a", "b", "c"), ("d",)])):
        batcher, backbone, _, stats = make(pools, max_batch_cost=64, max_wait_s=0.05, max_padding=cap)
        backbone.gate.clear()
        blocker = asyncio.create_task(batcher.submit(["z"]))
        await asyncio.get_running_loop().run_in_executor(None, backbone.entered.wait, 5)
        pending = [asyncio.create_task(batcher.submit([t])) for t in ("aa", "bb", "ccc", "d" * 10)]
        await asyncio.sleep(0.1)
        backbone.gate.set()
        await asyncio.gather(blocker, *pending)
        await batcher.stop()
        assert sorted(tuple(sorted(chr(x) for x in b)) for b in backbone.batches[1:]) == expected, cap
        assert all(1 - s.real_cost / s.padded_cost <= cap for s in stats)


async def test_padding_cap_never_blocks_the_oldest_item(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, _ = make(pools, max_padding=0.0, max_wait_s=0.001)
    texts = ["a", "b" * 5, "c" * 9, "d" * 5]
    results = await asyncio.gather(*(batcher.submit([t]) for t in texts))
    await batcher.stop()
    assert [(chr(int(r.rows[0][0])), int(r.rows[0][1])) for r in results] == [(t[0], len(t)) for t in texts]
    length = {ord(t[0]): len(t) for t in texts}
    assert all(len({length[x] for x in b}) == 1 for b in backbone.batches)  # no padding at all


async def test_full_queue_is_resource_exhausted_at_once(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, _ = make(pools, max_queue_items=6, max_batch_items=2)
    backbone.gate.clear()
    waiting = []
    for _ in range(3):
        waiting.append(asyncio.create_task(batcher.submit(["a", "b", "c"])))
        await asyncio.sleep(0.02)
    # 9 inputs: at most two batches (4 inputs) are taken, one running and one queued behind it; the rest
    # wait, and 2 more would pass the limit of 6.
    assert batcher.queue_depth >= 5
    try:
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.submit(["d", "e"])
    finally:
        backbone.gate.set()
    await asyncio.gather(*waiting)
    assert len((await batcher.submit(["d", "e"])).rows) == 2  # room again once the backbone caught up
    await batcher.stop()


async def test_cancelled_call_costs_no_backbone_work(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, _ = make(pools, max_batch_items=1)
    backbone.gate.clear()
    first = asyncio.create_task(batcher.submit(["first"]))
    await asyncio.get_running_loop().run_in_executor(None, backbone.entered.wait, 5)
    doomed = asyncio.create_task(batcher.submit(["doomed", "doomed too"]))
    kept = asyncio.create_task(batcher.submit(["kept"]))
    await asyncio.sleep(0.05)
    doomed.cancel()
    await asyncio.sleep(0.01)
    backbone.gate.set()
    await asyncio.gather(first, kept)
    await batcher.stop()
    firsts = [chr(x) for batch in backbone.batches for x in batch]
    assert "d" not in firsts and firsts == ["f", "k"]
    assert batcher.queue_depth == 0


async def test_flows_take_turns_so_one_big_call_does_not_starve_the_others(pools) -> None:  # type: ignore[no-untyped-def]
    """Issue 23: a big call's inputs all arrived first, so first-come batches ran all of them before anyone
    else's. Batches now take turns between flows: the small calls ride in the next batch."""
    batcher, backbone, _, _ = make(pools, max_batch_items=4, max_wait_s=0.001)
    backbone.gate.clear()
    blocker = asyncio.create_task(batcher.submit(["z"]))
    await asyncio.get_running_loop().run_in_executor(None, backbone.entered.wait, 5)
    big_inputs = [Input(text=f"a{i:03d}") for i in range(200)]
    big = asyncio.create_task(batcher.batcher.submit(big_inputs, flow="big"))
    await eventually(lambda: len(batcher.pending) >= 60, "the big call's first slice queued")
    # The big call entered the queue in a slice, not whole: its memory is what is in flight.
    assert len(batcher.pending) <= batcher.slice_inputs < len(big_inputs)
    small = [
        asyncio.create_task(batcher.batcher.submit([Input(text="b")], flow="s1")),
        asyncio.create_task(batcher.batcher.submit([Input(text="c")], flow="s2")),
    ]
    await eventually(lambda: len(batcher.pending) >= 62, "the small calls queued")
    backbone.gate.set()
    await asyncio.gather(blocker, big, *small)
    await batcher.stop()
    batches = backbone.batches[1:]
    served = {chr(first): i for i, batch in enumerate(batches) for first in batch if chr(first) in "bc"}
    assert served["b"] <= 1 and served["c"] <= 1, batches[:3]
    assert len(batches) >= 50  # the big call's 200 inputs in batches of 4, slice after slice
    assert batcher.queue_depth == 0 and batcher.admission.queued_inputs == 0


async def test_an_input_error_names_the_input_in_a_later_slice(pools) -> None:  # type: ignore[no-untyped-def]
    batcher, backbone, _, _ = make(pools, max_batch_items=2)

    def prepare(inputs):  # type: ignore[no-untyped-def]
        from headswap.server.errors import InputError

        for i, item in enumerate(inputs):
            if item.content == "bad":
                raise InputError(i, "is bad")
        return FakeBackbone.prepare(backbone, inputs)

    backbone.prepare = prepare  # type: ignore[method-assign]
    inputs = [Input(text="ok")] * 100 + [Input(text="bad")] + [Input(text="ok")] * 10
    with pytest.raises(InvalidArgument, match=r"inputs\[100\] is bad"):
        await batcher.batcher.submit(inputs)
    # The call ends at the error while a batch of its earlier inputs may still be running: that batch gives
    # its inputs back to admission when it finishes (observed), everything else at once.
    assert batcher.queue_depth == 0
    await eventually(lambda: batcher.admission.queued_inputs == 0, "the running batch's inputs released")
    await batcher.stop()
