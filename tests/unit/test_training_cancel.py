"""An abandoned AdaptHead (the caller cancels, or its deadline passes) stops its training, commits nothing the
caller was not told about, and frees the tenant's lock and the training worker. In process, on the fake
encoder, with one training worker so that a worker still busy would hold up the next training.

Each wait is for an observable condition (a progress event, a metric, a job on the training pool); the
timeouts only bound a hang."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.adapters import TrainingCancelled
from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import LimitsConfig, ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.services import training as training_module
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process
from tests.helpers import HANG, eventually

TEXTS = [f"{c} w{i} x{i % 4}" for c in ("red", "blue", "green") for i in range(6)]
LABELS = [t.split()[0] for t in TEXTS]
NEW = ["red q1", "blue q2", "green q3"]
NEW_LABELS = ["red", "blue", "green"]
BIG = [f"w{i} v{i % 97} u{i % 13}" for i in range(3000)]
BIG_LABELS = [f"c{i % 50}" for i in range(3000)]


def config(tmp_path: Path) -> ServerConfig:
    # A budget far beyond any test: only the abandonment can stop these trainings.
    limits = replace(LimitsConfig(), max_train_seconds=600.0, train_workers=1)
    return ServerConfig(warmup_rounds=0, home=tmp_path, limits=limits)


def cancelled_trainings(s: InProcess) -> float:
    value = s.server.metrics.registry.get_sample_value(
        "headswap_training_runs_total", {"outcome": "cancelled"}
    )
    return value or 0.0


async def assert_freed(s: InProcess, client: AsyncClient, tenant: str, versions: list[int]) -> None:
    """Nothing committed, the lock and the training worker free, and the next training goes through."""
    # The one training worker takes a job: the abandoned training no longer occupies it.
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(s.server.pools.train, lambda: None), HANG)
    gc.collect()
    assert len(s.server.heads.locks) == 0, "the tenant's lock outlived the abandoned call"
    head = await client.get_head(tenant)
    assert [v.version for v in head.versions] == versions, "a training nobody was told about was committed"
    assert head.example_count == len(TEXTS), "the abandoned call's examples were stored"
    after = await asyncio.wait_for(client.adapt_head(tenant, TEXTS, LABELS, validation_fraction=0), HANG)
    assert after.version == versions[-1] + 1 and after.activated


async def test_a_cancelled_training_stops_and_commits_nothing(tmp_path: Path) -> None:
    async with in_process(config(tmp_path), backbone=fake_backbone(), store=MemoryStore()) as s:
        async with AsyncClient(s.target, retries=0) as client:
            await client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            training = asyncio.Event()

            def on_progress(p: Any) -> None:
                if p.stage == "training":
                    training.set()

            call = asyncio.create_task(
                client.adapt_head(
                    "t",
                    BIG,
                    BIG_LABELS,
                    kind="mlp",
                    hidden_dim=2048,
                    max_epochs=1000,
                    validation_fraction=0,
                    on_progress=on_progress,
                )
            )
            await asyncio.wait_for(training.wait(), HANG)  # the real training is under way
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await eventually(lambda: cancelled_trainings(s) == 1, "the server saw the cancellation")
            await assert_freed(s, client, "t", [1])


async def test_a_training_past_its_callers_deadline_stops_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training that ends only when told to stop: the deadline must pass while it runs, on any machine.
    started, stopped = threading.Event(), threading.Event()

    def endless(*args: Any, should_stop: Callable[[], bool], **kwargs: Any) -> Any:
        started.set()
        while not should_stop():
            stopped.wait(0.01)
        stopped.set()
        raise TrainingCancelled("asked to stop")

    async with in_process(config(tmp_path), backbone=fake_backbone(), store=MemoryStore()) as s:
        async with AsyncClient(s.target, retries=0) as client:
            await client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            monkeypatch.setattr(training_module, "train_head", endless)
            with pytest.raises(HeadswapError) as info:
                await client.adapt_head("t", NEW, NEW_LABELS, validation_fraction=0, timeout=5.0)
            monkeypatch.undo()
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert started.is_set(), "the deadline passed before the training started"
            await eventually(stopped.is_set, "the training was told to stop")
            await eventually(lambda: cancelled_trainings(s) == 1, "the server counted it as cancelled")
            await assert_freed(s, client, "t", [1])
