"""The servicer, services and batcher end to end in process: real gRPC on loopback, the fake encoder and the
memory store, so each test takes milliseconds. The integration tests repeat the essentials on the real
backbone."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from headswap.client import AsyncClient, FailedPrecondition, HeadswapError, InvalidArgument, NotFound
from headswap.server.config import LimitsConfig, ServerConfig
from headswap.server.inference.fake import FakeEncoder, fake_backbone
from headswap.server.manifest import SEAL, HeadManifest
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc
from tests.helpers import HANG, eventually

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def labelled(n_per: int, labels: tuple[str, ...] = ("red", "green", "blue")) -> tuple[list[str], list[str]]:
    texts, ys = [], []
    for i, label in enumerate(labels):
        for j in range(n_per):
            texts.append(f"{label} {WORDS[j % len(WORDS)]} {WORDS[(i + j) % len(WORDS)]} {j}")
            ys.append(label)
    return texts, ys


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcess]:
    config = ServerConfig(
        warmup_rounds=0, home=tmp_path, limits=LimitsConfig(max_batch_inputs=8, max_examples=200)
    )
    async with in_process(config, backbone=fake_backbone(), store=MemoryStore()) as running:
        yield running


@pytest.fixture
async def client(server: InProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.target, retries=0, timeout=10) as c:
        yield c


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(HeadswapError) as info:
        await call  # type: ignore[misc]
    return info.value.code, info.value.details


async def test_embed_rows_are_per_input_in_order(client: AsyncClient) -> None:
    texts = ["one two", "three", "one two", "four five six"]
    together = await client.embed(texts)
    alone = np.stack([(await client.embed([t]))[0] for t in texts])
    assert together.shape == (4, 16) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together[0], together[2])
    half = await client.embed(texts, dtype="float16")
    assert half.dtype == np.float16 and np.allclose(half, together, atol=1e-3)


async def test_bad_embed_input_gets_invalid_argument(client: AsyncClient) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(client.embed([])) == (invalid, "inputs is empty: send at least one input")
    code, details = await code_of(client.embed(["fine", "  "]))
    assert code == invalid and "inputs[1]" in details
    code, details = await code_of(client.embed(["x"] * 9))
    assert code == invalid and "maximum of 8" in details


async def test_malformed_inputs_on_the_wire(server: InProcess) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        cases = [
            (
                pb.EmbedRequest(inputs=[pb.Input(text="a"), pb.Input(image=b"\xff\xd8")]),
                "inputs[1] is an image",
            ),
            (pb.EmbedRequest(inputs=[pb.Input()]), "inputs[0] has no content"),
            (pb.EmbedRequest(inputs=[pb.Input(text="a")], dtype=9), "unknown element type"),  # type: ignore[arg-type]
        ]
        for request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Embed(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (
                info.value.details() or ""
            )
            assert info.value.trailing_metadata() is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.AdaptHead(pb.AdaptHeadRequest(tenant="t", mode=5)).read()  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reply_too_large_is_refused_before_work(tmp_path: Path) -> None:
    backbone = fake_backbone(dim=64 * 1024)
    config = ServerConfig(warmup_rounds=0, home=tmp_path, limits=LimitsConfig(max_message_bytes=1024 * 1024))
    async with in_process(config, backbone=backbone, store=MemoryStore()) as running:
        async with AsyncClient(running.target, retries=0) as c:
            code, details = await code_of(c.embed(["x"] * 8))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "float16" in details
        assert isinstance(backbone.encoder, FakeEncoder) and backbone.encoder.batches == []


async def test_adapt_classify_and_manage(client: AsyncClient) -> None:
    texts, labels = labelled(6)
    progress: list[object] = []
    result = await client.adapt_head("acme", texts, labels, on_progress=progress.append)
    assert result.activated and result.version == 1 and result.embedded == len(texts)
    assert {p.stage for p in progress} == {"embedding", "training"}  # type: ignore[attr-defined]
    predictions = await client.classify("acme", texts[:8], top_k=5)
    assert [p.label for p in predictions] == labels[:8]
    assert all(len(p.labels) == 3 and p.version == 1 for p in predictions)
    again = await client.adapt_head("acme", [], [], validation_fraction=0)
    assert (again.version, again.cache_hits, again.embedded) == (2, len(texts), 0)
    details = await client.get_head("acme")
    assert details.active_version == 2 and [v.version for v in details.versions] == [1, 2]
    assert details.example_count == len(texts)
    assert [(h.tenant, h.active_version) for h in await client.list_heads()] == [("acme", 2)]
    rollback = await client.activate_head_version("acme", 1)
    assert (rollback.active_version, rollback.previous_version) == (1, 2)
    assert (await client.classify("acme", ["red"]))[0].version == 1
    assert (await client.classify("acme", ["red"], version=2))[0].version == 2
    deleted = await client.delete_head("acme")
    assert (deleted.versions_deleted, deleted.examples_deleted) == (2, len(texts))
    with pytest.raises(NotFound):
        await client.classify("acme", ["red"])


async def test_bad_head_requests(client: AsyncClient) -> None:
    texts, labels = labelled(3)
    await client.adapt_head("t1", texts, labels, validation_fraction=0)
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (client.classify("nobody", ["x"]), missing),
        (client.classify("t1", ["x"], version=9), missing),
        (client.classify("t1", ["x"], top_k=-1), invalid),
        (client.classify("a/b", ["x"]), invalid),
        (client.get_head("nobody"), missing),
        (client.activate_head_version("t1", 0), invalid),
        (client.activate_head_version("t1", 4), missing),
        (client.delete_head(".."), invalid),
        (client.adapt_head("t2", texts, ["same"] * len(texts)), invalid),
        (client.adapt_head("t2", texts, labels, max_epochs=10**6), invalid),
        (client.adapt_head("t2", [], []), invalid),
    ]
    for call, code in cases:
        assert (await code_of(call))[0] == code
    with pytest.raises(InvalidArgument, match="at least two labels"):
        await client.adapt_head("t2", texts, ["same"] * len(texts))
    with pytest.raises(NotFound):
        await client.get_head("t2")  # a refused training stores nothing


@pytest.fixture
async def roomy(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """A server that takes enough examples for the gate to have evidence."""
    config = ServerConfig(warmup_rounds=0, home=tmp_path, limits=LimitsConfig(max_examples=2000))
    async with in_process(config, backbone=fake_backbone(), store=MemoryStore()) as running:
        async with AsyncClient(running.target, retries=0, timeout=60) as c:
            yield c


def noise(n: int, classes: int, tag: str) -> tuple[list[str], list[str]]:
    """Texts of words no other text shares, labelled in turn: the labels carry no information."""
    return [f"{tag}{i}a {tag}{i}b {tag}{i}c" for i in range(n)], [f"l{i % classes}" for i in range(n)]


def words_say(n_per: int, classes: int, offset: int, noise_share: float = 0.0) -> tuple[list[str], list[str]]:
    """Each text carries its label's word; a share of the labels is then replaced by another label."""
    rng = np.random.default_rng(offset)
    texts, labels = [], []
    for c in range(classes):
        for j in range(n_per):
            texts.append(f"word{c} filler{offset + j} extra{(offset + j) % 7}")
            wrong = rng.random() < noise_share
            labels.append(f"l{(c + 1 + int(rng.integers(classes - 1))) % classes if wrong else c}")
    return texts, labels


async def test_negative_transfer_is_not_activated(roomy: AsyncClient) -> None:
    # The gate needs evidence: 600 examples of 40 labels that the inputs say nothing about.
    texts, labels = noise(600, 40, "n")
    result = await roomy.adapt_head("noise", texts, labels, seed=1)
    assert result.metrics.negative_transfer and not result.activated and result.active_version == 0
    assert result.held_back_by == "majority_baseline"
    (check,) = result.checks
    assert check.rule == "majority_baseline" and not check.passed and check.p_value < 0.01
    assert check.examples == 600 and "negative transfer" in check.detail
    with pytest.raises(FailedPrecondition, match="no active version"):
        await roomy.classify("noise", ["alpha"])
    forced = await roomy.adapt_head("noise", [], [], seed=1, force_activate=True)
    assert forced.activated and forced.held_back_by == "" and not forced.checks[0].passed


async def test_a_few_noisy_examples_are_no_evidence_of_negative_transfer(client: AsyncClient) -> None:
    # Thirty examples, one dominant label: the head cannot be shown to be worse than "always common".
    texts = [f"{WORDS[i % 18]} {i}" for i in range(30)]
    result = await client.adapt_head("few", texts, ["common"] * 26 + ["rare"] * 4, seed=1)
    assert result.activated and not result.metrics.negative_transfer and result.checks[0].passed


async def test_defaults_refit_on_every_example(client: AsyncClient) -> None:
    texts, labels = labelled(7)
    result = await client.adapt_head("refit", texts, labels)
    m = result.metrics
    assert m.train_examples == len(texts) == m.validation_examples and m.evaluated_on == "cross_validation"
    assert m.folds == 5 and m.expected_calibration_error is not None and m.log_loss is not None
    assert result.head.l2_source == "cross_validation" and result.head.l2 > 0 and result.head.temperature > 0
    held = await client.adapt_head("refit", [], [], validation_fraction=0.25)
    assert held.metrics.evaluated_on == "validation" and held.metrics.train_examples == len(texts)
    bare = await client.adapt_head("refit", [], [], validation_fraction=0, l2=2.0)
    assert (bare.metrics.evaluated_on, bare.head.l2, bare.head.l2_source) == ("train", 2.0, "caller")
    assert bare.head.temperature == 1.0


async def test_a_worse_challenger_is_held_back(roomy: AsyncClient) -> None:
    champion = await roomy.adapt_head("champ", *words_say(12, 10, offset=0))
    assert champion.activated and champion.checks[0].rule == "majority_baseline"
    # New texts, 60% of their labels replaced: still far better than the baseline, but worse than version 1
    # on examples version 1 never saw.
    challenger = await roomy.adapt_head(
        "champ", *words_say(12, 10, offset=100, noise_share=0.6), replace=True
    )
    baseline, versus = challenger.checks
    assert baseline.passed and not versus.passed and versus.rule == "active_version"
    assert versus.reference_version == 1 and versus.examples == 120 and versus.p_value < 0.01
    assert versus.accuracy < versus.reference_accuracy and "significantly worse" in versus.detail
    assert not challenger.activated and challenger.held_back_by == "active_version"
    assert challenger.active_version == 1 and (await roomy.classify("champ", ["word3"]))[0].version == 1
    # Clean new examples are compared the same way and promoted.
    better = await roomy.adapt_head("champ", *words_say(12, 10, offset=200), replace=True)
    assert better.activated and better.checks[1].passed and better.checks[1].examples == 120
    forced = await roomy.adapt_head(
        "champ", *words_say(12, 10, offset=100, noise_share=0.6), replace=True, force_activate=True
    )
    assert forced.activated and forced.held_back_by == ""


async def test_abstain_below_min_probability(client: AsyncClient) -> None:
    texts, labels = labelled(6)
    await client.adapt_head("unsure", texts, labels)
    inputs = [texts[0], "omicron pi rho", texts[7]]
    # By min_probability alone (ignore_ood: the behaviour before out-of-distribution abstention).
    plain = await client.classify("unsure", inputs, top_k=2, ignore_ood=True)
    assert not any(p.abstained for p in plain)
    threshold = sorted(p.probability for p in plain)[1]
    marked = await client.classify("unsure", inputs, top_k=2, min_probability=threshold, ignore_ood=True)
    assert [p.abstained for p in marked] == [p.probability < threshold for p in plain]
    assert any(p.abstained for p in marked) and not all(p.abstained for p in marked)
    assert all(len(p.labels) == 2 for p in marked)  # abstained predictions still list their labels
    everything = await client.classify("unsure", inputs, min_probability=1.0)
    assert all(p.abstained for p in everything if p.probability < 1.0)
    for bad in (-0.1, 1.5, float("nan")):
        code, details = await code_of(client.classify("unsure", inputs, min_probability=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_probability" in details


async def test_out_of_distribution_inputs_are_scored_flagged_and_abstained(client: AsyncClient) -> None:
    texts, labels = labelled(6)
    adapted = await client.adapt_head("ood", texts, labels)
    metrics = adapted.metrics
    assert metrics.ood_threshold is not None and 0 < metrics.ood_threshold < 2
    assert metrics.ood_flagged_share is not None and metrics.ood_flagged_share <= 0.05
    assert metrics.confidence_cap is not None and metrics.expected_calibration_error_interval is not None
    details = await client.get_head("ood")
    assert details.versions[-1].metrics.ood_threshold == metrics.ood_threshold
    inputs = [texts[0], "pizza pasta espresso tiramisu", texts[13]]
    got = await client.classify("ood", inputs, top_k=2)
    assert [p.out_of_distribution for p in got] == [False, True, False]
    assert got[0].ood_score == pytest.approx(0.0, abs=1e-5)  # a training example is its own neighbour
    assert got[1].ood_score > metrics.ood_threshold
    assert [p.abstained for p in got] == [False, True, False]
    assert len(got[1].labels) == 2  # still answered, labels listed
    kept = await client.classify("ood", inputs, ignore_ood=True)
    assert [p.abstained for p in kept] == [False, False, False]
    assert [p.out_of_distribution for p in kept] == [False, True, False]  # still reported
    both = await client.classify("ood", inputs, min_probability=1.0, ignore_ood=True)
    assert all(p.abstained for p in both if p.probability < 1.0)


async def test_a_head_stored_before_ood_scores_keeps_serving(server: InProcess, client: AsyncClient) -> None:
    """A version written before issue 24 (no stored examples, no threshold in its manifest) still loads and
    answers: ood_score NaN (nothing to compare with; 0 would claim the input is a training example) and
    out_of_distribution false, so nothing it answered before is abstained now."""
    import safetensors.numpy

    from headswap.adapters import read_weights_metadata
    from headswap.server.store import NewVersion

    texts, labels = labelled(6)
    await client.adapt_head("legacy", texts, labels)
    store = server.server.store
    stored = store.load_version("legacy", 1)
    tensors = safetensors.numpy.load(stored.weights)
    del tensors["ood.references"]
    weights = safetensors.numpy.save(tensors, metadata=read_weights_metadata(stored.weights))
    manifest = {
        k: v
        for k, v in stored.manifest.to_json().items()
        if k not in ("ood", "version", "weights_sha256", SEAL)
    }
    for name in ("ood_threshold", "ood_flagged_share", "confidence_cap", "log_loss_interval"):
        manifest["metrics"].pop(name)
    manifest["metrics"].pop("expected_calibration_error_interval")
    manifest["selection"].pop("fitted_temperature")
    loop = asyncio.get_running_loop()
    state = await loop.run_in_executor(
        None,
        store.commit_version,
        "legacy",
        NewVersion(HeadManifest.from_json(manifest), weights, store.examples("legacy"), False),
    )
    old = state.versions[-1]
    got = await client.classify("legacy", [texts[0], "pizza pasta espresso tiramisu"], version=old)
    assert [p.version for p in got] == [old, old]
    assert all(np.isnan(p.ood_score) for p in got)
    assert not any(p.out_of_distribution or p.abstained for p in got)
    described = (await client.get_head("legacy")).versions[-1]
    assert described.metrics.ood_threshold is None and described.metrics.confidence_cap is None
    # The version trained now flags the same off-topic input.
    assert [
        p.out_of_distribution for p in await client.classify("legacy", ["pizza pasta espresso tiramisu"])
    ] == [True]


async def test_a_change_from_the_store_reaches_the_bank(server: InProcess, client: AsyncClient) -> None:
    """A pointer moved, a version deleted and a tenant deleted behind the server's back (as another replica
    would) are applied through the feed."""
    texts, labels = labelled(4)
    await client.adapt_head("feed", texts, labels, validation_fraction=0)
    await client.adapt_head("feed", texts, labels, validation_fraction=0)
    assert (await client.classify("feed", ["red"]))[0].version == 2
    store = server.server.store
    loop = asyncio.get_running_loop()

    async def answer(version: int = 0) -> int:
        """The version that answers, or 0 for NOT_FOUND."""
        try:
            return (await client.classify("feed", ["red"], version=version))[0].version
        except NotFound:
            return 0

    async def until_answer(expected: int, version: int = 0) -> None:
        deadline = loop.time() + HANG
        while await answer(version) != expected:
            assert loop.time() < deadline, f"still not {expected} after {HANG:.0f} s"
            await asyncio.sleep(0.01)

    await loop.run_in_executor(None, store.activate, "feed", 1)
    await until_answer(1)
    # A version held by number, then deleted elsewhere: refused here too.
    assert await answer(version=2) == 2
    await loop.run_in_executor(None, store.delete_version, "feed", 2)
    await until_answer(0, version=2)
    assert await answer() == 1
    await loop.run_in_executor(None, store.delete, "feed")
    await until_answer(0)


async def test_an_expired_call_costs_no_encoder_work(
    server: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = server.server.backbone.encoder
    assert isinstance(encoder, FakeEncoder)
    entered = threading.Event()
    run = encoder.run

    def watched(feeds: Any, spare_core: bool = False) -> Any:
        entered.set()
        return run(feeds, spare_core)

    monkeypatch.setattr(encoder, "run", watched)
    encoder.gate.clear()
    count = server.server.metrics.registry.get_sample_value
    try:
        async with AsyncClient(server.target, retries=0, timeout=5) as slow:
            first = asyncio.create_task(slow.embed(["first"]))
            await eventually(entered.is_set)  # the encoder holds "first"
            cancelled = count("headswap_requests_total", {"rpc": "Embed", "code": "CANCELLED"}) or 0
            async with AsyncClient(server.target, retries=0, timeout=0.2) as hasty:
                with pytest.raises(HeadswapError) as info:
                    await hasty.embed(["doomed", "doomed too"])
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server has ended the expired call too, before the encoder is let go.
            await eventually(
                lambda: (
                    (count("headswap_requests_total", {"rpc": "Embed", "code": "CANCELLED"}) or 0) > cancelled
                )
            )
            encoder.gate.set()
            assert (await first).shape == (1, 16)
            assert (await slow.embed(["after"])).shape == (1, 16)
    finally:
        encoder.gate.set()
    assert encoder.batches == [1, 1], "the expired call's inputs reached the encoder"


async def test_unexpected_error_is_internal_with_a_request_id(
    server: InProcess, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.server.heads, "list_heads", broken)
    code, details = await code_of(client.list_heads())
    assert code == grpc.StatusCode.INTERNAL and "request id" in details and "RuntimeError" in details
    assert (await client.embed(["still serving"])).shape == (1, 16)


async def test_not_serving_until_warmed_up(tmp_path: Path) -> None:
    from headswap.server.app import build

    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, warmup_rounds=0, home=tmp_path)
    server = build(replace(config), backbone=fake_backbone(), store=MemoryStore())
    port = await server.rpc.start()  # listening, not yet open
    try:
        async with AsyncClient(f"127.0.0.1:{port}", retries=0) as c:
            code, details = await code_of(c.embed(["early"]))
            assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
    finally:
        await server.rpc.stop(0)
        server.pools.shutdown()


async def test_a_call_is_freed_when_it_ends_not_by_the_cycle_collector(client: AsyncClient) -> None:
    """Issue 9's soak: two reference cycles per call held each call's state (gRPC's `RPCState`) until the
    cycle collector ran, and a few in a hundred were kept: every call left gRPC's request reader suspended
    (a generator whose frame refers back to it), and every refused call ended with `context.abort`, whose
    AbortError gRPC keeps on the state while its traceback holds the handler's frames. With the collector
    off, the states of finished calls, answered or refused, must not pile up."""

    def live_call_states() -> int:
        return sum(type(o).__name__ == "RPCState" for o in gc.get_objects())

    # The server keeps a few states ready for the next calls: let it fill that pool first.
    for i in range(150):
        await code_of(client.classify(f"ghost-{i}", ["x"]))
    gc.collect()
    gc.disable()
    try:
        before = live_call_states()
        for i in range(40):
            code, _ = await code_of(client.classify(f"ghost-{i}", ["x"]))
            assert code == grpc.StatusCode.NOT_FOUND
            code, _ = await code_of(client.embed([]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert (await client.embed(["x"])).shape == (1, 16)
        # States are let go as each call's last reference goes (just after its reply): wait for that, not
        # for a fixed time; states held in cycles never go while the collector is off.
        leftover = [live_call_states() - before]

        def freed() -> bool:
            leftover[0] = live_call_states() - before
            return leftover[0] < 10

        try:
            await eventually(freed, timeout=10.0)
        except AssertionError:
            pass
    finally:
        gc.enable()
    assert leftover[0] < 10, f"{leftover[0]} states of 120 finished calls wait for the cycle collector"


async def test_memory_gauges_follow_the_cache_and_the_head_stacks(
    server: InProcess, client: AsyncClient
) -> None:
    """The soak (bench/soak.py) splits the server's memory growth by these gauges."""

    def gauge(name: str) -> float:
        value = server.server.metrics.registry.get_sample_value(name)
        assert value is not None, f"{name} is not exported"
        return value

    entries, allocated = gauge("headswap_embedding_cache_entries"), gauge("headswap_heads_allocated_bytes")
    texts, labels = labelled(4)
    await client.adapt_head("gauges", texts, labels, validation_fraction=0)
    assert gauge("headswap_embedding_cache_entries") == entries + len(texts)
    assert gauge("headswap_heads_allocated_bytes") >= allocated + 3 * (16 + 1) * 4  # one head of 3 classes
    assert gauge("headswap_heads_allocated_bytes") >= gauge("headswap_heads_resident_bytes") > 0
    await client.delete_head("gauges")
    assert gauge("headswap_embedding_cache_entries") == entries
