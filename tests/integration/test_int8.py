"""Precisions over time on one store: int8 only when asked for, and a head follows its backbone's weights
from one precision to another (the same store served in fp32, then int8, then fp16); --strict-precision
keeps the older refusal. Each precision's own numbers are in test_precisions.py; replicas of different
precisions at once, in test_mixed_precision.py."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError
from headswap.server.inference.precision import has_vnni, read_cpu_flags
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "pin_blocked"]


def start(backbone_dir: Path, store: Path, log: Path, *flags: str) -> ServerProcess:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", *flags, log_path=log
    )
    proc.wait_serving()
    return proc


def examples(data: Data, split: str, per: int) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in INTENTS for t in data[split][i][:per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def test_a_head_follows_its_weights_across_precisions(
    int8_backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:
    """One store served in fp32, then int8, then fp16: the head trained on fp32 answers on each, the one
    trained on int8 answers on fp32 and fp16; each reply says which precision answered and which trained."""
    backbone_dir = int8_backbone_dir
    store = tmp_path / "store"
    test_texts, test_labels = examples(banking77, "test", 10)
    answers: dict[str, list[str]] = {}
    fp32 = start(backbone_dir, store, tmp_path / "fp32.log", "--precision", "fp32")
    try:
        with Client(fp32.target) as client:
            trained = client.adapt_head("by-fp32", *examples(banking77, "train", 8), replace=True)
            assert trained.activated and trained.head is not None
            assert trained.head.trained_precision == "fp32"
            answers["fp32"] = [p.label for p in client.classify("by-fp32", test_texts)]
    finally:
        assert fp32.terminate() == 0, fp32.log()
    int8 = start(backbone_dir, store, tmp_path / "int8.log", "--precision", "int8")
    try:
        with Client(int8.target) as client:
            got = client.classify("by-fp32", test_texts)
            assert {(p.precision, p.trained_precision, p.cross_precision) for p in got} == {
                ("int8", "fp32", True)
            }
            assert got[0].version == trained.version  # the same version, not a retrained one
            answers["int8"] = [p.label for p in got]
            version = client.get_head("by-fp32").versions[-1]
            assert (version.trained_precision, version.served_precision) == ("fp32", "int8")
            on_int8 = client.adapt_head("by-int8", *examples(banking77, "train", 8), replace=True)
            assert on_int8.head is not None and on_int8.head.trained_precision == "int8"
    finally:
        assert int8.terminate() == 0, int8.log()
    fp16 = start(backbone_dir, store, tmp_path / "fp16.log", "--precision", "fp16")
    try:
        with Client(fp16.target) as client:
            for tenant, trainer in (("by-fp32", "fp32"), ("by-int8", "int8")):
                got = client.classify(tenant, test_texts)
                assert {(p.precision, p.trained_precision) for p in got} == {("fp16", trainer)}
            answers["fp16"] = [p.label for p in client.classify("by-fp32", test_texts)]
    finally:
        assert fp16.terminate() == 0, fp16.log()
    # The same head answers the same on every precision, all but the odd borderline question.
    for precision, labels in answers.items():
        right = np.mean([a == y for a, y in zip(labels, test_labels, strict=True)])
        same = np.mean([a == b for a, b in zip(labels, answers["fp32"], strict=True)])
        print(f"\nhead trained on fp32, served in {precision}: {right:.0%} right, {same:.0%} as in fp32")
        assert right > 0.85 and same >= 0.9, (precision, right, same)


def test_strict_precision_refuses_another_fingerprint(
    int8_backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:
    backbone_dir = int8_backbone_dir
    store = tmp_path / "store"
    fp32 = start(backbone_dir, store, tmp_path / "fp32.log", "--precision", "fp32")
    try:
        with Client(fp32.target) as client:
            assert client.adapt_head("acme", *examples(banking77, "train", 8), replace=True).activated
    finally:
        assert fp32.terminate() == 0, fp32.log()
    strict = start(
        backbone_dir, store, tmp_path / "int8.log", "--precision", "int8", "--strict-precision", "true"
    )
    try:
        with Client(strict.target) as client:
            with pytest.raises(HeadswapError) as info:
                client.classify("acme", ["where is my new card?"])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "--strict-precision" in info.value.details and "--precision fp32" in info.value.details
            version = client.get_head("acme").versions[-1]
            assert (version.trained_precision, version.served_precision) == ("fp32", "")
    finally:
        assert strict.terminate() == 0, strict.log()


def test_auto_serves_fp32_on_any_cpu(backbone_dir: Path, tmp_path: Path) -> None:
    """auto keeps the model's numbers on a CPU, VNNI or not (the log says whether int8 would pay off here)."""
    proc = start(backbone_dir, tmp_path / "store", tmp_path / "auto.log", "--device", "cpu")
    try:
        with Client(proc.target) as client:
            info = client.embed_full(["hello"]).backbone
        manifest = json.loads((backbone_dir / "manifest.json").read_text())
        assert info.precision == "fp32" and info.fingerprint == manifest["fingerprint"], proc.log()
        assert "precision auto: fp32" in proc.log()
        assert ("this CPU has avx" in proc.log()) == has_vnni(read_cpu_flags()), proc.log()
    finally:
        assert proc.terminate() == 0, proc.log()
