"""Durability: heads, versions and active pointers survive a restart, and a SIGKILL mid-training."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from headswap.client import AdaptProgress, Client, HeadswapError
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]


def start(backbone_dir: Path, store: Path, log: Path) -> ServerProcess:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", log_path=log
    )
    proc.wait_serving()
    return proc


def data(banking77: Data, per: int, intents: list[str] = INTENTS) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in intents for t in banking77["train"][i][:per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def test_state_survives_restart(backbone_dir: Path, banking77: Data, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = start(backbone_dir, store, tmp_path / "a.log")
    probe = ["My card still hasn't arrived", "What is your exchange rate for dollars?"]
    try:
        with Client(proc.target) as client:
            client.adapt_head("durable", *data(banking77, 8))
            client.adapt_head("durable", *data(banking77, 8, INTENTS[:2]), replace=True)
            client.activate_head_version("durable", 1)
            client.adapt_head("other", *data(banking77, 6, INTENTS[1:3]))
            before_heads = client.list_heads()
            before = client.get_head("durable")
            before_answers = client.classify("durable", probe, top_k=2)
    finally:
        assert proc.terminate() == 0
    proc = start(backbone_dir, store, tmp_path / "b.log")
    try:
        with Client(proc.target) as client:
            assert client.list_heads() == before_heads
            assert client.get_head("durable") == before
            assert client.classify("durable", probe, top_k=2) == before_answers
            assert client.classify("durable", probe)[0].version == 1
            # The embedding cache was persisted too: retraining embeds nothing.
            again = client.adapt_head("durable", [], [])
            assert again.embedded == 0 and again.cache_hits == again.head.example_count == 16
    finally:
        assert proc.terminate() == 0


def test_sigkill_mid_training_keeps_previous_version(
    backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    proc = start(backbone_dir, store, tmp_path / "a.log")
    probe = ["I lost my card yesterday"]
    try:
        with Client(proc.target) as client:
            v1 = client.adapt_head("fragile", *data(banking77, 10))
            answer = client.classify("fragile", probe, top_k=4)
        training = threading.Event()
        outcome: list[object] = []

        def on_progress(p: AdaptProgress) -> None:
            if p.stage == "training":
                training.set()

        def slow_training() -> None:
            # A wide MLP over many examples: seconds of training, killed after its first epoch.
            texts, labels = data(banking77, 100)
            with Client(proc.target, retries=0) as client:
                try:
                    outcome.append(
                        client.adapt_head(
                            "fragile",
                            texts,
                            labels,
                            replace=True,
                            kind="mlp",
                            hidden_dim=2048,
                            max_epochs=1000,
                            on_progress=on_progress,
                        )
                    )
                except HeadswapError as exc:
                    outcome.append(exc.code)

        worker = threading.Thread(target=slow_training)
        worker.start()
        assert training.wait(120), proc.log()
        proc.kill()
        worker.join(30)
        assert outcome == [grpc.StatusCode.UNAVAILABLE], "the training finished before the kill"
    finally:
        proc.kill()
    proc = start(backbone_dir, store, tmp_path / "b.log")
    try:
        with Client(proc.target) as client:
            head = client.get_head("fragile")
            assert head.active_version == v1.version == 1
            assert [v.version for v in head.versions] == [1]
            assert head.example_count == 40  # the examples of version 1, not the half-trained request's
            assert client.classify("fragile", probe, top_k=4) == answer
            nxt = client.adapt_head("fragile", [], [])
            assert nxt.version == 2
    finally:
        assert proc.terminate() == 0
