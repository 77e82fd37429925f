"""Out-of-distribution scores and thresholds, and confidence bounded by the held-out record (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headswap.adapters import TrainConfig, head_from_bytes, head_to_bytes, metrics_from_manifest, train_head
from headswap.adapters.calibration import laplace_cap, min_temperature, softmax
from headswap.adapters.grouped import HeadStack
from headswap.adapters.inference import HeadModule
from headswap.adapters.ood import (
    REFERENCES_TENSOR,
    fit_ood,
    learn_threshold,
    nearest_distance,
    normalize_rows,
    select_references,
)
from headswap.adapters.selection import plan_evaluation
from headswap.adapters.serialization import HeadFormatError
from headswap.adapters.spec import HeadSpec

DIM = 16


def clusters(
    seed: int, classes: int = 3, per_class: int = 10, spread: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated unit-norm clusters: cross-validation gets every example right."""
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.normal(size=(classes, DIM)))
    y = np.repeat(np.arange(classes), per_class)
    return normalize_rows(centres[y] + spread * rng.normal(size=(y.size, DIM))), y


def test_laplace_cap_is_the_rule_of_succession() -> None:
    y = np.zeros(30, dtype=np.int64)
    right = np.tile([0.99, 0.01], (30, 1))
    assert laplace_cap(right, y) == pytest.approx(31 / 32)
    one_wrong = right.copy()
    one_wrong[0] = [0.001, 0.999]
    assert laplace_cap(one_wrong, y) == pytest.approx(30 / 32)


def test_min_temperature_bounds_the_mean_top_probability() -> None:
    logits = np.random.default_rng(0).normal(scale=20, size=(50, 4))
    t = min_temperature(logits, 0.9)
    assert softmax(logits / t).max(axis=1).mean() <= 0.9 + 1e-9
    assert softmax(logits / (t * 0.99)).max(axis=1).mean() > 0.9  # and it is the smallest such
    assert min_temperature(logits / 1000, 0.99) == pytest.approx(1e-3)  # never below the bound that exists


def test_a_set_cross_validation_gets_all_right_is_held_to_the_laplace_bound() -> None:
    x, y = clusters(1)
    config = TrainConfig(device="cpu")
    head = train_head(x, y, 3, config)
    m = head.metrics
    assert m.accuracy == 1.0 and m.validation_examples == 30
    assert m.confidence_cap == pytest.approx(31 / 32)
    # The log loss alone would drive the temperature towards 0 (every held-out prediction is right); the cap
    # raised it until the held-out predictions claim on average no more than 31/32.
    fitted, served = head.selection.fitted_temperature, head.selection.temperature
    assert fitted is not None and served > fitted
    plan = plan_evaluation(y, 3, None, config.seed)
    held = np.empty((30, 3))
    for fit_idx, held_idx in plan.folds:
        fold = train_head(
            x[fit_idx], y[fit_idx], 3, TrainConfig(device="cpu", validation_fraction=0, l2=head.selection.l2)
        )
        # The fold's logits (its probabilities carry no temperature without validation).
        held[held_idx] = np.log(HeadModule.from_head(fold).predict_proba(x[held_idx]))
    assert softmax(held / served).max(axis=1).mean() <= 31 / 32 + 0.01
    # Small-set scores say how uncertain they are.
    assert m.log_loss_interval is not None and m.expected_calibration_error_interval is not None
    low, high = m.expected_calibration_error_interval
    assert 0 <= low <= high


def test_the_threshold_comes_from_the_held_out_folds() -> None:
    x, y = clusters(3, per_class=12)
    config = TrainConfig(device="cpu", seed=5)
    head = train_head(x, y, 3, config)
    plan = plan_evaluation(y, 3, None, config.seed)
    assert len(plan.folds) == 5
    # Each held-out example against the examples its fold was fit on, never against itself.
    distances = np.empty(y.size, dtype=np.float32)
    for fit_idx, held_idx in plan.folds:
        distances[held_idx] = nearest_distance(normalize_rows(x[fit_idx]), x[held_idx])
    threshold, share = learn_threshold(distances)
    assert head.metrics.ood_threshold == pytest.approx(threshold)
    assert head.metrics.ood_flagged_share == pytest.approx(share) and share <= 0.05
    assert threshold > 0  # examples are never their own neighbours in the folds
    # The served head keeps every example (under the cap per class), unit-norm.
    assert head.ood_references is not None and head.ood_references.shape == (36, DIM)
    np.testing.assert_allclose(np.linalg.norm(head.ood_references, axis=1), 1.0, atol=1e-5)
    # Without validation there are no held-out predictions, so no threshold (scores still served).
    plain = train_head(x, y, 3, TrainConfig(device="cpu", validation_fraction=0))
    assert plain.metrics.ood_threshold is None and plain.ood_references is not None


def test_references_are_capped_per_class() -> None:
    y = np.repeat(np.arange(3), [5, 100, 64])
    kept = select_references(y, 3, 64, seed=0)
    assert np.bincount(y[kept]).tolist() == [5, 64, 64]
    assert np.array_equal(kept, select_references(y, 3, 64, seed=0))  # deterministic for a seed
    x = normalize_rows(np.random.default_rng(0).normal(size=(y.size, DIM)))
    model = fit_ood(x, y, 3, plan_evaluation(y, 3, None, 0), seed=0, per_class=64)
    assert model.references.shape == (133, DIM) and model.threshold is not None


def test_references_round_trip_and_are_validated() -> None:
    x, y = clusters(4)
    head = train_head(x, y, 3, TrainConfig(device="cpu"))
    weights, manifest = head_to_bytes(head)
    assert manifest["ood"] == {"score": "nearest_example_cosine_distance", "references": 30}
    loaded = head_from_bytes(weights, manifest)
    assert loaded.references is not None
    np.testing.assert_array_equal(loaded.references, head.ood_references)
    metrics = metrics_from_manifest(manifest)
    assert metrics.ood_threshold == head.metrics.ood_threshold
    assert metrics.confidence_cap == head.metrics.confidence_cap
    assert metrics.log_loss_interval == head.metrics.log_loss_interval
    # A version from before (no references, no "ood", no threshold) still loads.
    from dataclasses import replace

    old_head = replace(head, ood_references=None)
    old_weights, old_manifest = head_to_bytes(old_head)
    assert "ood" not in old_manifest
    assert head_from_bytes(old_weights, old_manifest).references is None
    # Weights and manifest that disagree are damage, not a head.
    with pytest.raises(HeadFormatError, match=REFERENCES_TENSOR):
        head_from_bytes(old_weights, manifest)
    with pytest.raises(HeadFormatError, match="ood"):
        head_from_bytes(weights, old_manifest)


def test_stack_scores_each_row_against_its_own_head_in_one_pass() -> None:
    stack = HeadStack(DIM)
    rng = np.random.default_rng(0)
    spec = HeadSpec("linear", DIM, 3)
    state = {"weight": rng.normal(size=(3, DIM)).astype(np.float32), "bias": np.zeros(3, np.float32)}
    refs_a = normalize_rows(rng.normal(size=(5, DIM)))
    refs_b = normalize_rows(rng.normal(size=(12, DIM)))
    a = stack.add(spec, state, refs_a)
    b = stack.add(
        HeadSpec("mlp", DIM, 2, hidden_dim=8),
        {
            "hidden.weight": rng.normal(size=(8, DIM)).astype(np.float32),
            "hidden.bias": np.zeros(8, np.float32),
            "output.weight": rng.normal(size=(2, 8)).astype(np.float32),
            "output.bias": np.zeros(2, np.float32),
        },
        refs_b,
    )
    legacy = stack.add(spec, state)  # stored before references were kept
    x = rng.normal(size=(7, DIM)).astype(np.float32)
    slots = [a, b, legacy, a, b, b, legacy]
    rows = stack.apply_scored(x, slots)
    want = {a: nearest_distance(refs_a, x), b: nearest_distance(refs_b, x)}
    for i, slot in enumerate(slots):
        probs, score = rows[i]
        np.testing.assert_allclose(probs, stack.apply(x[i : i + 1], [slot])[0], atol=1e-6)
        if slot == legacy:
            assert np.isnan(score)
        else:
            assert score == pytest.approx(float(want[slot][i]), abs=1e-5)
    # One head alone takes the single-product path: the same answers.
    alone = stack.ood_scores(x, [a] * 7)
    np.testing.assert_allclose(alone, want[a], atol=1e-5)
    # References count in the head's bytes and are freed with it.
    assert stack.nbytes(a) == 4 * (DIM + 1) * 4 + refs_a.nbytes
    stack.release(a)
    assert np.isnan(stack.ood_scores(x[:1], [legacy])[0])


def test_cpu_scoring_matches_the_grouped_torch_operations() -> None:
    """`apply_scored` on a CPU (numpy, one head at a time) gives what `apply` and `ood_scores` give: heads of
    several widths and kinds in one unsorted batch, several rows per head, one head alone, torch input."""
    stack = HeadStack(DIM)
    rng = np.random.default_rng(3)
    slots = []
    for classes, refs in ((2, 4), (3, 0), (7, 30), (77, 200), (5, 1)):
        state = {
            "weight": rng.normal(size=(classes, DIM)).astype(np.float32),
            "bias": rng.normal(size=classes).astype(np.float32),
        }
        references = normalize_rows(rng.normal(size=(refs, DIM))) if refs else None
        slots.append(stack.add(HeadSpec("linear", DIM, classes), state, references))
    mlp_state = {
        "hidden.weight": rng.normal(size=(8, DIM)).astype(np.float32),
        "hidden.bias": np.zeros(8, np.float32),
        "output.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "output.bias": np.zeros(4, np.float32),
    }
    slots.append(
        stack.add(HeadSpec("mlp", DIM, 4, hidden_dim=8), mlp_state, normalize_rows(rng.normal(size=(6, DIM))))
    )
    batch = [slots[i] for i in rng.integers(0, len(slots), 40)]
    for rows in (batch, [slots[3]] * 9, [slots[1]] * 3, [slots[5], slots[0]]):
        x = rng.normal(size=(len(rows), DIM)).astype(np.float32)
        want_probs, want_scores = stack.apply(x, rows), stack.ood_scores(x, rows)
        for got in (stack.apply_scored(x, rows), stack.apply_scored(torch.as_tensor(x), rows)):
            assert len(got) == len(rows)
            for (probs, score), want_p, want_s in zip(got, want_probs, want_scores, strict=True):
                assert probs.shape == want_p.shape
                np.testing.assert_allclose(probs, want_p, rtol=1e-5, atol=1e-6)
                assert probs.sum() == pytest.approx(1.0, abs=1e-5)
                if np.isnan(want_s):
                    assert np.isnan(score)
                else:
                    assert score == pytest.approx(float(want_s), abs=1e-5)
    assert stack.apply_scored(np.zeros((0, DIM), np.float32), []) == []
    with pytest.raises(ValueError, match="expected embeddings"):
        stack.apply_scored(np.zeros((2, DIM), np.float32), [slots[0]])


def test_bootstrap_intervals_are_the_scores_of_resampled_predictions() -> None:
    """The interval's draws sum per-example terms computed once; each is the score of that resample."""
    from headswap.adapters.calibration import (
        BOOTSTRAP_DRAWS,
        bootstrap_interval,
        expected_calibration_error,
    )

    rng = np.random.default_rng(5)
    for n, classes in ((7, 3), (60, 4), (500, 77)):
        probs = softmax(rng.normal(scale=3, size=(n, classes)))
        labels = rng.integers(0, classes, n)
        draws = np.random.default_rng(11)
        ece, loss = [], []
        for _ in range(BOOTSTRAP_DRAWS):
            idx = draws.integers(0, n, n)
            ece.append(expected_calibration_error(probs[idx], labels[idx]))
            loss.append(float(-np.mean(np.log(probs[idx, labels[idx]]))))
        for score, values in (("ece", ece), ("log_loss", loss)):
            low, high = bootstrap_interval(probs, labels, score, seed=11)
            assert low == pytest.approx(np.percentile(values, 2.5), abs=1e-12)
            assert high == pytest.approx(np.percentile(values, 97.5), abs=1e-12)
            assert low <= high
