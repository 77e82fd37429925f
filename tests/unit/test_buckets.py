"""Shape buckets: the choice of shape is a pure function, padding to it changes no embedding, and a batcher
with buckets runs only the shapes warm-up ran."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headswap.server.domain import Input
from headswap.server.inference.batcher import Batcher
from headswap.server.inference.buckets import LENGTHS, ShapeBuckets
from headswap.server.inference.fake import fake_backbone
from headswap.server.inference.text import pad
from tests.helpers import batch_policy


def test_grid_for_a_text_backbone() -> None:
    buckets = ShapeBuckets.for_backbone(256, 256)
    assert buckets.rows == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert buckets.lengths[0] == 16 and buckets.lengths[-1] == 256 and set(buckets.lengths) <= set(LENGTHS)
    assert len(buckets.shapes()) == 9 * len(buckets.lengths) == 135
    # A max length that is not on the grid is its last length; a batch cap that is no power of two, its last row.
    odd = ShapeBuckets.for_backbone(24, 100)
    assert odd.rows == (1, 2, 4, 8, 16, 24) and odd.lengths[-1] == 100 and odd.lengths[-2] == 96
    assert ShapeBuckets.for_backbone(16, None).lengths == ()  # images: rows only


@given(n=st.integers(1, 256), length=st.integers(1, 256))
def test_a_batch_fits_the_smallest_bucket_that_holds_it(n: int, length: int) -> None:
    buckets = ShapeBuckets.for_backbone(256, 256)
    rows, bucket_length = buckets.shape(n, length)
    assert rows >= n and bucket_length >= length
    assert rows < 2 * n  # powers of two: at most half of a bucket's rows are padding
    smaller = [b for b in buckets.lengths if b < bucket_length]
    assert not smaller or smaller[-1] < length  # no smaller length holds it
    # Past 24 tokens, at most a quarter of a bucket's positions are padding.
    if length > 24:
        assert (bucket_length - length) / bucket_length <= 0.25


@given(n=st.integers(1, 256), cap=st.floats(0.0, 1.0))
def test_items_taken_keep_row_padding_within_the_cap(n: int, cap: float) -> None:
    buckets = ShapeBuckets.for_backbone(256, 256)
    take = buckets.items_to_take(n, cap)
    assert 1 <= take <= n
    rows = buckets.row_bucket(take)
    assert take == n or rows == take  # either all of them, or exactly a bucket full
    assert take == rows or (rows - take) <= cap * rows


def test_out_of_range_is_an_error() -> None:
    buckets = ShapeBuckets.for_backbone(16, 128)
    with pytest.raises(ValueError):
        buckets.row_bucket(17)
    with pytest.raises(ValueError):
        buckets.length_bucket(129)
    with pytest.raises(ValueError):
        ShapeBuckets((2, 1), (16,))


def test_padding_rows_and_positions() -> None:
    from headswap.server.inference.protocols import Prepared

    items = [Prepared(np.array([101, 7, 102]), 3, 3), Prepared(np.array([101, 102]), 2, 2)]
    ids, mask = pad(items, (4, 8))
    assert ids.shape == mask.shape == (4, 8)
    assert mask[:2].sum(1).tolist() == [3, 2] and ids[0, :3].tolist() == [101, 7, 102]
    # Spare rows hold the first token alone, so that no row is empty.
    assert ids[2:, 0].tolist() == [101, 101] and mask[2:].sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError):
        pad(items, (1, 8))


def test_bucket_padding_changes_no_embedding(backbone_dir: Path) -> None:
    """The real backbone, fp32 on the CPU: texts padded to a bucket (spare rows and positions) embed as they
    do alone and unpadded (cosine >= 0.9999)."""
    from headswap.server.inference.onnx import load_backbone

    backbone = load_backbone(backbone_dir, device="cpu", precision="fp32")
    texts = ["card arrived?", "what is the exchange rate for euros to dollars today please", "hi"]
    pre = backbone.preprocessor
    items = pre.prepare([Input(text=t) for t in texts])
    alone = np.stack([backbone.encoder.run(pre.collate([item]))[0] for item in items])
    buckets = ShapeBuckets.for_backbone(16, backbone.manifest.max_length)
    shape = buckets.shape(len(items), max(len(i.payload) for i in items))
    padded = backbone.encoder.run(pre.collate(items, shape))
    assert padded.shape[0] == shape[0] == 4
    cosine = (alone * padded[: len(items)]).sum(1) / (
        np.linalg.norm(alone, axis=1) * np.linalg.norm(padded[: len(items)], axis=1)
    )
    assert cosine.min() >= 0.9999, cosine


async def test_a_bucketed_batcher_runs_only_warmed_shapes() -> None:
    backbone = fake_backbone(dim=8, max_length=32)
    shapes: list[tuple[int, ...]] = []
    run = backbone.encoder.run

    def recording(feeds, spare_core=False):  # type: ignore[no-untyped-def]
        shapes.append(feeds["input_ids"].shape)
        return run(feeds, spare_core)

    backbone.encoder.run = recording  # type: ignore[method-assign]
    buckets = ShapeBuckets.for_backbone(16, 32)
    with ThreadPoolExecutor(2) as pre, ThreadPoolExecutor(1) as bb:
        batcher = Batcher(
            backbone, batch_policy(max_batch_items=16), pre, bb, buckets=buckets, prepare_workers=2
        )
        batcher.start()
        assert await batcher.warm_up_buckets() == len(buckets.shapes())
        warmed = set(shapes)
        assert warmed == set(buckets.shapes())
        rng = np.random.default_rng(0)
        requests = [
            [Input(text=" ".join(f"w{int(x)}" for x in rng.integers(0, 50, rng.integers(1, 30))))]
            * int(rng.integers(1, 6))
            for _ in range(40)
        ]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
    assert set(shapes) <= warmed and len(shapes) > len(warmed)
    # Every caller got its own rows, as the same texts embed alone.
    reference = fake_backbone(dim=8, max_length=32)
    for request, result in zip(requests, results, strict=True):
        want = reference.encoder.run(reference.preprocessor.collate(reference.preprocessor.prepare(request)))
        assert np.allclose(np.stack(result.rows), want, atol=1e-6)
