"""Issue 23.6: while the server refuses calls, its CPU forward passes run on one ONNX Runtime thread fewer, so
that the event loop keeps a core to refuse and answer calls in milliseconds (on 2 cores the encoder's two
threads took both, and refusals waited 0.1 to 1.8 s for the loop)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from headswap.server.domain import Input
from headswap.server.errors import ResourceExhausted
from headswap.server.inference.admission import RELIEF_S, Admission
from headswap.server.inference.batcher import Batcher
from headswap.server.inference.protocols import Backbone
from headswap.server.manifest import BackboneManifest
from tests.helpers import batch_policy
from tests.unit.test_batcher import FakeBackbone


def test_refusing_lasts_a_while_after_the_last_refusal() -> None:
    admission = Admission(max_items=1, max_wait_s=1.0)
    assert not admission.refusing()
    admission.admit(1, 0, None)
    assert not admission.refusing(), "admitting is not refusing"
    with pytest.raises(ResourceExhausted, match="queue is full"):
        admission.admit(1, 1, None)
    refused = admission.refused_at
    assert admission.refusing(refused + RELIEF_S / 2)
    assert not admission.refusing(refused + RELIEF_S + 0.01)


async def test_forward_passes_spare_a_core_only_while_calls_are_refused() -> None:
    tok, bb = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    encoder = FakeBackbone()
    manifest = BackboneManifest("fake", 3, "none", "l2", 64, "text", "0" * 64)
    batcher = Batcher(
        Backbone(manifest, encoder, encoder), batch_policy(max_queue_items=2), tok, bb, prepare_workers=2
    )  # type: ignore[arg-type]
    batcher.start()
    try:
        await batcher.submit([Input(text="alone")])
        assert encoder.spare_core == [False]
        encoder.entered.clear()
        encoder.gate.clear()  # the encoder stalls, and a call bigger than the queue's room is refused
        first = asyncio.ensure_future(batcher.submit([Input(text="one")]))
        await asyncio.to_thread(encoder.entered.wait, 5)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.submit([Input(text=t) for t in ("two", "three", "four")])
        encoder.gate.set()
        await first
        await batcher.submit([Input(text="five")])
        assert encoder.spare_core == [False, False, True], "only the pass formed after the refusal"
        batcher.admission.refused_at -= RELIEF_S  # a second without refusals
        await batcher.submit([Input(text="after")])
        assert encoder.spare_core[-1] is False
    finally:
        encoder.gate.set()
        await batcher.stop()
        tok.shutdown(wait=False)
        bb.shutdown(wait=False)


def test_the_spare_session_is_the_same_model_on_one_thread_fewer(backbone_dir: Path) -> None:
    from headswap.server.inference.onnx import load_backbone

    two = load_backbone(backbone_dir, device="cpu", precision="fp32", intra_op_threads=2, spare_core=True)
    encoder = two.encoder
    assert encoder.spare_session is not None  # type: ignore[attr-defined]
    options = encoder.spare_session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 1
    assert encoder.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    feeds = two.preprocessor.collate(two.preprocessor.prepare([Input(text="where is my card?")]))
    np.testing.assert_allclose(encoder.run(feeds, spare_core=True), encoder.run(feeds), atol=1e-5)
    one = load_backbone(backbone_dir, device="cpu", precision="fp32", intra_op_threads=1, spare_core=True)
    assert one.encoder.spare_session is None, "one thread has no core to spare"  # type: ignore[attr-defined]
    off = load_backbone(backbone_dir, device="cpu", precision="fp32", intra_op_threads=2, spare_core=False)
    assert off.encoder.spare_session is None  # type: ignore[attr-defined]
    assert off.encoder.run(feeds, spare_core=True).shape == (1, two.dim)
