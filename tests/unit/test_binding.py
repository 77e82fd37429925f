"""Heads are bound to the backbone's weights, not its precision: a fleet of replicas serving one backbone in
fp32, fp16 and int8 serves every head everywhere; other weights, or --strict-precision, are refused with the
way out named. In process, on the fake backbone (its precisions compute the same vectors: what is tested here
is the binding, not the numbers; tests/integration/test_precisions.py has the real ones)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from headswap.adapters import TrainConfig, head_to_bytes, train_head
from headswap.client import AsyncClient, FailedPrecondition
from headswap.server.binding import Bindings, HeadBinding, ServedBackbone, binding_fields
from headswap.server.config import ServerConfig
from headswap.server.domain import Example, Input
from headswap.server.inference.fake import fake_backbone
from headswap.server.manifest import HeadManifest
from headswap.server.store import NewVersion
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process
from tests.unit.test_in_process import labelled

MANIFEST = fake_backbone().manifest
WEIGHTS, INT8_FP = MANIFEST.fingerprint, MANIFEST.fingerprint_int8
CROSS = "headswap_cross_precision_predictions_total"


def served(precision: str, **changes: object) -> ServedBackbone:
    return ServedBackbone.of(replace(MANIFEST, **changes), precision)  # type: ignore[arg-type]


def bound(precision: str) -> HeadBinding:
    return Bindings([]).of(binding_fields(MANIFEST, precision))


# -- the rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trained", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("serving", ["fp32", "fp16", "int8"])
def test_any_precision_of_the_weights_serves_a_head(trained: str, serving: str) -> None:
    bindings = Bindings([served(serving)])
    head = bound(trained)
    assert head.weights == WEIGHTS and head.precision == trained and head.name == "headswap/fake"
    assert bindings.check("acme", 1, head).precision == serving
    assert bindings.is_cross(head, bindings.served[WEIGHTS]) == (trained != serving)


@pytest.mark.parametrize(
    ("trained", "serving", "answered"),
    [
        ("fp32", "fp32", True),
        ("fp16", "fp32", True),  # fp32 and fp16 share one fingerprint: the rule before this one
        ("fp32", "fp16", True),
        ("int8", "fp32", False),
        ("fp32", "int8", False),
        ("fp16", "int8", False),
        ("int8", "int8", True),
    ],
)
def test_strict_precision_keeps_the_fingerprint_rule(trained: str, serving: str, answered: bool) -> None:
    bindings = Bindings([served(serving)], strict=True)
    assert (bindings.serving(bound(trained)) is not None) == answered
    if not answered:
        with pytest.raises(Exception, match="--strict-precision") as info:
            bindings.check("acme", 3, bound(trained))
        assert f"--precision {trained}" in str(info.value) and "retrain" not in str(info.value)


def test_other_weights_are_refused_naming_the_backbone_that_would_serve_them() -> None:
    bindings = Bindings([ServedBackbone.of(fake_backbone(name="other/model").manifest, "fp32", "text")])
    with pytest.raises(Exception, match="headswap/fake") as info:
        bindings.check("acme", 2, bound("int8"))
    message = str(info.value)
    assert f"weights {WEIGHTS[:12]}" in message and "does not serve" in message
    assert "--backbone" in message and "other/model" in message, message
    # A head from before the record names its fingerprint: the manifest.json to look for.
    with pytest.raises(Exception, match=f"fingerprint {INT8_FP[:12]}"):
        bindings.check("acme", 2, bindings.of({"backbone_fingerprint": INT8_FP}))


def test_a_precision_whose_export_recorded_no_passing_gate_serves_only_its_own_heads() -> None:
    failed = Bindings([served("int8", parity_min_cosine_int8=0.97)])
    assert failed.serving(bound("int8")) is not None  # same precision: nothing crosses
    with pytest.raises(Exception, match="no passing parity gate"):
        failed.check("acme", 1, bound("fp32"))


def test_heads_stored_before_the_record_are_mapped_to_their_weights() -> None:
    bindings = Bindings([served("fp32")])
    old_int8 = bindings.of({"backbone_fingerprint": INT8_FP})
    assert (old_int8.weights, old_int8.precision) == (WEIGHTS, "int8")
    old_fp32 = bindings.of({"backbone_fingerprint": WEIGHTS})
    assert (old_fp32.weights, old_fp32.precision) == (WEIGHTS, "")  # fp32 or fp16: not recorded
    assert bindings.serving(old_int8) is bindings.serving(old_fp32) is bindings.served[WEIGHTS]
    assert bindings.is_cross(old_int8, bindings.served[WEIGHTS])
    assert not bindings.is_cross(old_fp32, bindings.served[WEIGHTS])
    assert bindings.is_cross(old_fp32, Bindings([served("int8")]).served[WEIGHTS])


def test_cache_keys_differ_per_precision() -> None:
    keys = {p: fake_backbone(precision=p).embedding_key for p in ("fp32", "fp16", "int8")}
    assert len(set(keys.values())) == 3
    assert keys["fp32"] == WEIGHTS and keys["int8"] == INT8_FP  # the keys caches were stored under before


# -- a fleet in one process: replicas of one store, each in its own precision ------------------------------


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[dict[str, InProcess]]:
    """fp32, fp16 and int8 replicas, a strict int8 one and one of other weights, all on one store."""
    store = MemoryStore()
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    replicas = {
        "fp32": (config, fake_backbone(precision="fp32")),
        "fp16": (config, fake_backbone(precision="fp16")),
        "int8": (config, fake_backbone(precision="int8")),
        "strict-int8": (replace(config, strict_precision=True), fake_backbone(precision="int8")),
        "other": (config, fake_backbone(name="other/model")),
    }
    async with AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(in_process(c, backbone=b, store=store))
            for name, (c, b) in replicas.items()
        }


def cross_count(replica: InProcess, trained: str, serving: str) -> float:
    value = replica.server.metrics.registry.get_sample_value(CROSS, {"trained": trained, "served": serving})
    return float(value or 0.0)


async def test_a_head_trained_on_any_precision_is_served_by_every_replica(
    fleet: dict[str, InProcess],
) -> None:
    texts, labels = labelled(8)
    for trainer in ("fp32", "fp16", "int8"):
        tenant = f"trained-{trainer}"
        async with AsyncClient(fleet[trainer].target, retries=0, timeout=10) as client:
            result = await client.adapt_head(tenant, texts, labels, validation_fraction=0.25)
            assert result.head is not None and result.head.trained_precision == trainer
            assert result.head.served_precision == trainer
        for name in ("fp32", "fp16", "int8"):
            before = cross_count(fleet[name], trainer, name)
            async with AsyncClient(fleet[name].target, retries=0, timeout=10) as client:
                answers = await client.classify(tenant, ["red alpha", "blue beta", "green gamma"])
                head = (await client.get_head(tenant)).versions[-1]
            assert [a.label for a in answers] == ["red", "blue", "green"]
            assert {(a.precision, a.trained_precision) for a in answers} == {(name, trainer)}
            assert all(a.cross_precision == (name != trainer) for a in answers)
            assert (head.trained_precision, head.served_precision) == (trainer, name)
            assert head.weights_fingerprint == WEIGHTS
            assert head.backbone_fingerprint == MANIFEST.fingerprint_for(trainer)
            # Counted per prediction, by precision trained on and served; same-precision answers are not.
            assert cross_count(fleet[name], trainer, name) - before == (3 if name != trainer else 0)


async def test_strict_and_other_weights_refuse_with_the_way_out(fleet: dict[str, InProcess]) -> None:
    texts, labels = labelled(8)
    async with AsyncClient(fleet["fp32"].target, retries=0, timeout=10) as client:
        await client.adapt_head("acme", texts, labels, validation_fraction=0.25)
    async with AsyncClient(fleet["strict-int8"].target, retries=0, timeout=10) as client:
        with pytest.raises(FailedPrecondition, match="--strict-precision") as info:
            await client.classify("acme", ["red alpha"])
        assert "--precision fp32" in info.value.details
        head = (await client.get_head("acme")).versions[-1]
        assert (head.trained_precision, head.served_precision) == ("fp32", "")
    async with AsyncClient(fleet["other"].target, retries=0, timeout=10) as client:
        with pytest.raises(FailedPrecondition, match="headswap/fake") as info:
            await client.classify("acme", ["red alpha"])
        assert "does not serve" in info.value.details and "other/model" in info.value.details
        # Retraining there moves the tenant to that backbone: its stored examples are embedded again.
        moved = await client.adapt_head("acme", [], [], validation_fraction=0.25)
        assert moved.head is not None and moved.head.weights_fingerprint != WEIGHTS
        assert (await client.classify("acme", ["red alpha"]))[0].label == "red"


async def test_one_training_never_mixes_precisions_from_the_cache(fleet: dict[str, InProcess]) -> None:
    texts, labels = labelled(6)
    async with AsyncClient(fleet["fp32"].target, retries=0, timeout=10) as client:
        first = await client.adapt_head("cache", texts, labels, validation_fraction=0.25)
        again = await client.adapt_head("cache", texts[:3], labels[:3], validation_fraction=0.25)
    assert first.embedded == len(texts) and again.cache_hits == len(texts) + 3  # fp32 reuses fp32's
    async with AsyncClient(fleet["int8"].target, retries=0, timeout=10) as client:
        on_int8 = await client.adapt_head("cache", [], [], validation_fraction=0.25)
    assert on_int8.cache_hits == 0 and on_int8.embedded == len(texts)  # none of fp32's vectors
    store = fleet["fp32"].server.store
    for precision in ("fp32", "int8"):
        key = fake_backbone(precision=precision).embedding_key
        assert len(store.cached_embeddings("cache", key)) == len(texts)


async def test_a_head_stored_before_precisions_were_recorded_keeps_serving(tmp_path: Path) -> None:
    """A version whose manifest has only the int8 fingerprint (as every int8 head had) answers on fp32."""
    store = MemoryStore()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    y = np.arange(12) % 2
    head = train_head(x, y, 2, TrainConfig(validation_fraction=0))
    legacy = {
        "labels": ["neg", "pos"],
        "backbone_fingerprint": INT8_FP,
        "created_at": 0.0,
        "example_count": 12,
    }
    weights, manifest = head_to_bytes(head, extra_manifest=legacy)
    examples = [Example(Input(text=f"t{i}"), ["neg", "pos"][i % 2]) for i in range(12)]
    store.commit_version("legacy", NewVersion(HeadManifest.from_json(manifest), weights, examples, True))
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with (
        in_process(config, backbone=fake_backbone(precision="fp32"), store=store) as server,
        AsyncClient(server.target, retries=0, timeout=10) as client,
    ):
        (answer,) = await client.classify("legacy", ["anything"])
        assert answer.label in ("neg", "pos") and (answer.precision, answer.trained_precision) == (
            "fp32",
            "int8",
        )
        version = (await client.get_head("legacy")).versions[0]
        assert (version.trained_precision, version.served_precision) == ("int8", "fp32")
        assert version.weights_fingerprint == WEIGHTS and version.backbone_fingerprint == INT8_FP
        assert cross_count(server, "int8", "fp32") == 1
