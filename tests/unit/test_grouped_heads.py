"""HeadStack: one grouped operation over many tenants' heads gives each row its own head's answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headswap.adapters import HeadModule, HeadSpec, TrainConfig, train_head
from headswap.adapters.grouped import HeadStack

DIM = 16


def make_head(seed: int, classes: int, kind: str = "linear") -> tuple[HeadSpec, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((classes * 6, DIM)).astype(np.float32)
    y = np.repeat(np.arange(classes), 6)
    x[np.arange(len(y)), y % DIM] += 3.0
    head = train_head(
        x, y, classes, TrainConfig(kind=kind, seed=seed, hidden_dim=8 + seed, max_epochs=5, device="cpu")
    )
    return head.spec, head.state


def test_mixed_batch_matches_each_head_alone() -> None:
    stack = HeadStack(DIM, initial_slots=2)  # forces the slab to grow
    heads = [make_head(i, 2 + i % 5, "mlp" if i % 4 == 3 else "linear") for i in range(9)]
    slots = [stack.add(spec, state) for spec, state in heads]
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(heads), size=40)
    x = rng.standard_normal((40, DIM)).astype(np.float32)
    got = stack.apply(x, [slots[h] for h in rows])
    for i, h in enumerate(rows):
        spec, state = heads[h]
        want = HeadModule.from_state(spec, state).predict_proba(x[i : i + 1])[0]
        assert got[i].shape == (spec.num_classes,)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_single_tenant_batch_is_one_group() -> None:
    stack = HeadStack(DIM)
    spec, state = make_head(0, 3)
    slot = stack.add(spec, state)
    x = np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32)
    got = np.stack(stack.apply(x, [slot] * 64))
    np.testing.assert_allclose(got, HeadModule.from_state(spec, state).predict_proba(x), rtol=1e-5, atol=1e-6)


def test_release_reuses_slot_without_touching_others() -> None:
    stack = HeadStack(DIM, initial_slots=2)
    a = stack.add(*make_head(0, 3))
    b = stack.add(*make_head(1, 4))
    x = np.random.default_rng(3).standard_normal((1, DIM)).astype(np.float32)
    before_b = stack.apply(x, [b])[0]
    stack.release(a)
    c = stack.add(*make_head(2, 3))  # a's class-count bucket: a's slot is reused
    assert c == a and len(stack) == 2
    np.testing.assert_array_equal(stack.apply(x, [b])[0], before_b)
    assert stack.apply(x, [c])[0].shape == (3,)


def test_bad_shapes_are_refused() -> None:
    stack = HeadStack(DIM)
    spec, state = make_head(0, 3)
    slot = stack.add(spec, state)
    with pytest.raises(ValueError, match="expected embeddings"):
        stack.apply(np.zeros((2, DIM + 1), np.float32), [slot, slot])
    with pytest.raises(ValueError, match="input dim"):
        HeadStack(DIM + 1).add(spec, state)
    assert torch.isfinite(torch.as_tensor(stack.apply(np.zeros((1, DIM), np.float32), [slot])[0])).all()


def test_a_wide_head_does_not_widen_every_other_one() -> None:
    """Slabs by class-count bucket: 400 four-class heads and one 1000-class head cost about what they
    weigh, not 401 heads padded to 1000 classes (what one slab for all cost before)."""
    stack = HeadStack(DIM)
    small = make_head(0, 4)
    slots = [stack.add(*small) for _ in range(400)]
    narrow = stack.allocated_bytes()
    rng = np.random.default_rng(5)
    wide = HeadSpec("linear", DIM, 1000)
    stack.add(
        wide,
        {"weight": rng.standard_normal((1000, DIM)).astype(np.float32), "bias": np.zeros(1000, np.float32)},
    )
    grown = stack.allocated_bytes() - narrow
    assert grown <= 4 * 1024 * (DIM + 1) * 4, grown  # the wide head's own slab, nothing else
    assert narrow <= 2 * 512 * 4 * (DIM + 1) * 4
    x = rng.standard_normal((2, DIM)).astype(np.float32)
    assert [p.shape for p in stack.apply(x, [slots[0], slots[-1]])] == [(4,), (4,)]


def test_slabs_follow_the_heads_resident_now_not_the_most_ever_held() -> None:
    """Issue 9's soak: tenants gain classes and move up to wider buckets; the rows they leave behind must not
    stay allocated. 96 three-class heads, each replaced by a five-class one (as a retraining with new labels
    does): the four-class slab shrinks back, the heads still answering are untouched."""
    stack = HeadStack(DIM, initial_slots=2)
    three, five = make_head(0, 3), make_head(1, 5)
    old = [stack.add(*three) for _ in range(96)]
    x = np.random.default_rng(4).standard_normal((1, DIM)).astype(np.float32)
    want_three = stack.apply(x, [old[0]])[0]
    row_bytes = (DIM + 1) * 4  # a class's weights and bias
    assert stack.allocated_bytes() == 128 * 4 * row_bytes  # 96 heads: the slab doubled from 2 to 128 rows
    new = []
    for slot in old[1:]:  # one three-class head stays, in the lowest row
        new.append(stack.add(*five))
        stack.release(slot)
    want_five = stack.apply(x, [new[0]])[0]
    assert stack.allocated_bytes() == (2 * 4 + 128 * 8) * row_bytes  # the four-class slab back to 2 rows
    np.testing.assert_array_equal(stack.apply(x, [old[0]])[0], want_three)
    for slot in new[1:]:
        stack.release(slot)
    assert stack.allocated_bytes() == (2 * 4 + 2 * 8) * row_bytes
    np.testing.assert_array_equal(stack.apply(x, [new[0]])[0], want_five)
    np.testing.assert_array_equal(stack.apply(x, [old[0]])[0], want_three)


def test_a_new_head_takes_the_lowest_free_row() -> None:
    stack = HeadStack(DIM, initial_slots=8)
    slots = [stack.add(*make_head(0, 3)) for _ in range(6)]
    stack.release(slots[4])
    stack.release(slots[1])
    assert stack.add(*make_head(1, 3)) == slots[1]
    assert stack.add(*make_head(2, 3)) == slots[4]
