"""Several backbones in one server (in process, fake encoders): routing by input kind or name, heads bound
to the backbone they were trained on, one head stack and one batcher per backbone; the settings that
configure them."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from headswap.client import AsyncClient, FailedPrecondition, InvalidArgument
from headswap.server.app import build
from headswap.server.backbones import name_lanes
from headswap.server.config import ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process
from tests.unit.test_in_process import labelled

SMALL, LARGE = fake_backbone(dim=16), fake_backbone(dim=24)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_backbones_from_flags_and_environment(tmp_path: Path) -> None:
    flags = ServerConfig.from_sources(parse(["--backbone", "/a", "--backbone", "pets=/b"]), environ={})
    assert flags.backbones == (("", Path("/a")), ("pets", Path("/b"))) and flags.backbone == Path("/a")
    env = ServerConfig.from_sources(parse([]), environ={"HEADSWAP_BACKBONE": "text=/a, image=/b"})
    assert env.backbones == (("text", Path("/a")), ("image", Path("/b")))
    with pytest.raises(ValueError, match="a backbone's name is 1 to 32"):
        ServerConfig.from_sources(parse(["--backbone", "Bad Name=/a"]), environ={})
    missing = ServerConfig(backbones=(("", tmp_path),), home=tmp_path, warmup_rounds=0)
    with pytest.raises(FileNotFoundError, match="not an exported backbone"):
        build(missing, store=MemoryStore())


def test_lane_names_are_unique() -> None:
    assert [n for n, _ in name_lanes([("", SMALL), ("big", LARGE)])] == ["text", "big"]
    with pytest.raises(ValueError, match="two backbones are served as 'text'"):
        name_lanes([("", SMALL), ("", LARGE)])
    with pytest.raises(ValueError, match="the same backbone is given twice"):
        name_lanes([("a", SMALL), ("b", SMALL)])


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[InProcess]:
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=[("small", SMALL), ("large", LARGE)], store=MemoryStore()) as s:
        yield s


async def test_routing_by_name_and_heads_bound_to_their_backbone(two: InProcess) -> None:
    texts, labels = labelled(6)
    async with AsyncClient(two.target, retries=0, timeout=10) as client:
        with pytest.raises(
            InvalidArgument, match=r"several backbones here take text inputs \(small, large\)"
        ):
            await client.embed(["a"])
        assert (await client.embed(["a"], backbone="large")).shape == (1, 24)
        assert (await client.embed_full(["a"], backbone="small")).backbone.served_as == "small"
        with pytest.raises(InvalidArgument, match="no backbone named 'medium'; it serves small \\(text\\)"):
            await client.embed(["a"], backbone="medium")
        big = await client.adapt_head("t1", texts, labels, backbone="large")
        small = await client.adapt_head("t2", texts, labels, backbone="small")
        assert big.head and small.head
        assert big.head.backbone_fingerprint == LARGE.fingerprint != small.head.backbone_fingerprint
        # Classify names no backbone: the head's own answers.
        assert [p.label for p in await client.classify("t1", texts[:3])] == labels[:3]
        assert [p.label for p in await client.classify("t2", texts[:3])] == labels[:3]
        # Retraining the tenant adds to its examples on the same backbone, unless it asks for another.
        again = await client.adapt_head("t1", texts[:3], labels[:3], backbone="large")
        assert again.stored_examples == len(texts) + 3
    lanes = {lane.name: lane for lane in two.server.lanes}
    assert len(lanes["large"].stack) == 1 and len(lanes["small"].stack) == 1
    assert lanes["large"].batcher is not lanes["small"].batcher
    from prometheus_client import generate_latest

    exposition = generate_latest(two.server.metrics.registry).decode()
    assert exposition.count("headswap_backbone_info{") == 2 and 'served_as="large"' in exposition


async def test_a_head_of_a_backbone_no_longer_served(tmp_path: Path) -> None:
    store = MemoryStore()
    texts, labels = labelled(6)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=[("large", LARGE)], store=store) as first:
        async with AsyncClient(first.target, retries=0, timeout=10) as client:
            await client.adapt_head("t", texts, labels)
    async with in_process(config, backbone=[("small", SMALL)], store=store) as second:
        async with AsyncClient(second.target, retries=0, timeout=10) as client:
            # The error names the backbone that would serve the head (retraining is not the only way out).
            with pytest.raises(
                FailedPrecondition, match=r"trained on backbone headswap/fake \(weights"
            ) as info:
                await client.classify("t", texts[:1])
            assert f"weights {LARGE.weights[:12]}), which this server does not serve" in info.value.details


async def test_a_set_too_large_for_one_call_is_stored_in_parts_then_trained_once(tmp_path: Path) -> None:
    texts, labels = labelled(20)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=SMALL, store=MemoryStore()) as running:
        seen: list[tuple[str, int, int]] = []
        async with AsyncClient(running.target, retries=0, timeout=10) as client:
            # Sorted by label, so the first parts hold one class only: storing them must not ask for two.
            result = await client.adapt_head(
                "t",
                texts,
                labels,
                chunk_bytes=300,
                on_progress=lambda p: seen.append((p.stage, p.done, p.total)),
            )
            details = await client.get_head("t")
        assert result.version == 1 and result.stored_examples == 60
        # Counted for the whole upload: every example embedded once (by the part that carried it), none of
        # them cached before the upload began; the last call's own count would say 40+ cache hits.
        assert (result.embedded, result.cache_hits) == (60, 0)
        assert [v.version for v in details.versions] == [1] and details.example_count == 60
        embedding = [(d, t) for s, d, t in seen if s == "embedding"]
        assert embedding[-1] == (60, 60) and all(t == 60 for _, t in embedding)
        assert [d for d, _ in embedding] == sorted(d for d, _ in embedding)
        runs = running.server.metrics.registry.get_sample_value(
            "headswap_training_runs_total", {"outcome": "activated"}
        )
        assert runs == 1, "storing parts is not a training"
