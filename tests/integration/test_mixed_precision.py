"""A fleet of mixed precisions on one real PostgreSQL: one replica `--precision fp32`, one `--precision int8`
(as a node pool of mixed CPU generations, or CPU nodes beside GPU ones, would run). A head trained on either
is served by both; each reply says which precision answered and which trained; each replica counts the
answers it gave across precisions; and one training never takes vectors cached by the other precision."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from headswap.client import Client, HeadswapError, Prediction
from tests.helpers import ServerProcess, free_port

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "pin_blocked"]


def examples(data: Data, split: str, per: int, offset: int = 0) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in INTENTS for t in data[split][i][offset : offset + per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


@pytest.fixture
def fleet(
    int8_backbone_dir: Path, postgres_dsn: str, tmp_path: Path
) -> Iterator[dict[str, tuple[ServerProcess, int]]]:
    """{precision: (replica, its metrics port)} for fp32 and int8, both on one PostgreSQL database."""
    replicas = {}
    for precision in ("fp32", "int8"):
        port = free_port()
        flags = ["--store", postgres_dsn, "--store-migrate", "true", "--warmup-rounds", "0"]
        proc = ServerProcess(
            "--backbone", str(int8_backbone_dir), *flags, "--precision", precision,
            log_path=tmp_path / f"{precision}.log", metrics_port=port,
        )  # fmt: skip
        replicas[precision] = (proc, port)
    try:
        for proc, _ in replicas.values():
            proc.wait_serving()
        yield replicas
    finally:
        for proc, _ in replicas.values():
            assert proc.terminate() == 0, proc.log()


def cross_answers(metrics_port: int, trained: str, served: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = (
        rf'^headswap_cross_precision_predictions_total\{{served="{served}",trained="{trained}"\}} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no cross-precision series for {trained} -> {served}"
    return float(found.group(1))


def classify_when_known(target: str, tenant: str, texts: list[str], version: int) -> list[Prediction]:
    """The replica's answers once it serves `version` (another replica trained it: the store's change feed
    brings it here). Polls; the time it takes is not what this test is about (test_replicas.py)."""
    deadline = time.monotonic() + 60
    with Client(target, retries=0) as client:
        while True:
            try:
                answers = client.classify(tenant, texts)
                if answers[0].version == version:
                    return answers
            except HeadswapError as exc:
                assert exc.code.name == "NOT_FOUND", exc  # only "not yet known here" is expected
            assert time.monotonic() < deadline, f"{target} never served {tenant} v{version}"
            time.sleep(0.05)


def test_a_head_trained_on_either_precision_is_served_by_both(
    fleet: dict[str, tuple[ServerProcess, int]], banking77: Data
) -> None:
    test_texts, test_labels = examples(banking77, "test", 20)
    labels_by: dict[tuple[str, str], list[str]] = {}
    for trainer in ("fp32", "int8"):
        tenant = f"trained-on-{trainer}"
        with Client(fleet[trainer][0].target) as client:
            result = client.adapt_head(tenant, *examples(banking77, "train", 10), replace=True)
        assert result.activated and result.head is not None and result.head.trained_precision == trainer
        for server in ("fp32", "int8"):
            proc, port = fleet[server]
            before = cross_answers(port, trainer, server) if server != trainer else 0.0
            answers = classify_when_known(proc.target, tenant, test_texts, result.version)
            assert {(a.precision, a.trained_precision) for a in answers} == {(server, trainer)}
            assert all(a.cross_precision == (server != trainer) for a in answers)
            if server != trainer:
                assert cross_answers(port, trainer, server) - before == len(test_texts)
            with Client(proc.target) as client:
                version = client.get_head(tenant).versions[-1]
            assert (version.trained_precision, version.served_precision) == (trainer, server)
            labels_by[(trainer, server)] = [a.label for a in answers]
    for (trainer, server), labels in labels_by.items():
        right = np.mean([a == y for a, y in zip(labels, test_labels, strict=True)])
        same = np.mean([a == b for a, b in zip(labels, labels_by[(trainer, trainer)], strict=True)])
        print(f"\ntrained on {trainer}, served by {server}: {right:.0%} right, {same:.0%} as its own replica")
        assert right > 0.85 and same >= 0.9, (trainer, server, right, same)


def test_one_training_never_mixes_the_precisions_cached_by_the_fleet(
    fleet: dict[str, tuple[ServerProcess, int]], banking77: Data
) -> None:
    texts, labels = examples(banking77, "train", 6)
    with Client(fleet["fp32"][0].target) as client:
        first = client.adapt_head("cached", texts, labels, replace=True)
        again = client.adapt_head("cached", [], [])
    assert first.embedded == len(texts) and again.cache_hits == len(
        texts
    )  # fp32's own vectors, from the store
    with Client(fleet["int8"][0].target) as client:
        on_int8 = client.adapt_head("cached", [], [])
        on_int8_again = client.adapt_head("cached", [], [])
    assert on_int8.cache_hits == 0 and on_int8.embedded == len(texts)  # not one of fp32's
    assert on_int8_again.cache_hits == len(texts)  # its own, from then on
    assert on_int8.head is not None and on_int8.head.trained_precision == "int8"
