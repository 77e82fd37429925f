"""Issue 23, item 1, on a real server: the real backbone, a real local store, calls whose deadlines pass at
any moment of their AdaptHead (embedding, training, commit), each followed at once by a DeleteHead. The delete
stays done: no file of the tenant is left, and it never comes back quarantined. A regression check: the
commit is a few milliseconds of the call, and these 30 trials passed on the code before the fix too; the
deterministic case (a commit held while the call is cancelled) and the 250-trial loop run in process on the
fake encoder: tests/unit/test_cancel_delete.py."""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import pytest

from headswap.client import Client, HeadswapError
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

TRIALS = 30
TEXTS = [f"{w} order {i}" for w in ("refund", "track", "cancel") for i in range(6)]
LABELS = [t.split()[0] for t in TEXTS]


def test_calls_cut_off_by_their_deadline_never_undo_a_delete(backbone_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    rng = random.Random(23)
    with ServerProcess(
        "--backbone", str(backbone_dir), "--warmup-rounds", "0", store=store, log_path=tmp_path / "log"
    ) as proc:
        proc.wait_serving()
        with Client(proc.target, retries=0) as client:
            client.adapt_head("warm", TEXTS, LABELS, validation_fraction=0)
            started = time.monotonic()
            client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            typical = time.monotonic() - started
            for trial in range(TRIALS):
                try:
                    client.adapt_head(
                        # Mostly near the end of the call, where its commit runs.
                        "t",
                        TEXTS,
                        LABELS,
                        validation_fraction=0,
                        timeout=rng.uniform(0.6, 1.05) * typical,
                    )
                except HeadswapError as exc:
                    assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                try:
                    client.delete_head("t")
                except HeadswapError as exc:
                    assert exc.code == grpc.StatusCode.NOT_FOUND, exc
                # The delete waited for whatever the cut-off call had left running: nothing may come back.
                time.sleep(0.2)
                assert "t" not in [h.tenant for h in client.list_heads()], (
                    f"trial {trial}: the tenant is back"
                )
                left = [p for p in (store / "tenants").glob("*") if p.name.lstrip(".").startswith("t")]
                assert not left, f"trial {trial}: {left} left on disk"
