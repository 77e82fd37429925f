"""Model selection, calibration and the promotion gate of headswap.adapters, on synthetic embeddings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.linear_model import LogisticRegression

from headswap.adapters import (
    ACTIVE_VERSION,
    DEFAULT_L2,
    L2_GRID,
    HeadModule,
    TrainConfig,
    active_version_check,
    binomial_cdf,
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    stratified_folds,
    train_head,
)
from headswap.adapters.calibration import softmax
from headswap.adapters.selection import MAX_CV_WORK, choose_l2, plan_evaluation
from tests.unit.test_adapters import DIM, blobs, separable_task


def overlapping_task(seed: int, classes: int, per_class: int, spread: float = 2.7):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, DIM))
    train = blobs(rng, centers, [per_class] * classes, spread)
    test = blobs(rng, centers, [100] * classes, spread)
    return train, test


# --- folds and plans ----------------------------------------------------------------------------------


def test_folds_keep_every_class_share_in_every_fold() -> None:
    sizes = [8, 8, 13, 5]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    fold = stratified_folds(labels, 4, 5, seed=1)
    for c, n in enumerate(sizes):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        # Every class is dealt from fold 0: floor or ceil of n/k each, the larger counts in the low folds.
        assert per_fold.tolist() == [n // 5 + (1 if f < n % 5 else 0) for f in range(5)]
    assert not np.array_equal(fold, stratified_folds(labels, 4, 5, seed=2))


def test_plan_cross_validates_small_sets_and_holds_out_on_large_ones() -> None:
    labels = np.repeat(np.arange(3), [3, 9, 20])
    plan = plan_evaluation(labels, 3, None, seed=0)
    assert plan.method == "cross_validation" and len(plan.folds) == 3  # k from the smallest class
    assert np.array_equal(plan.held_out, np.arange(labels.size))
    for fit, held in plan.folds:
        assert np.intersect1d(fit, held).size == 0 and fit.size + held.size == labels.size
    big = np.arange(MAX_CV_WORK // 2 + 2) % 2
    large = plan_evaluation(big, 2, None, seed=0)
    assert large.method == "validation" and len(large.folds) == 1
    assert large.held_out.size == pytest.approx(0.2 * big.size, abs=2)
    assert plan_evaluation(np.repeat(np.arange(2), 40), 2, None, seed=0).folds.__len__() == 5
    assert plan_evaluation(labels, 3, 0.0, seed=0).method == "train"
    assert plan_evaluation(labels, 3, 0.3, seed=0).method == "validation"


def test_choose_l2_keeps_the_default_unless_another_value_is_clearly_better() -> None:
    rng = np.random.default_rng(0)
    grid = L2_GRID
    default = grid.index(DEFAULT_L2)
    base = rng.uniform(0.5, 1.5, 400)
    # Neighbouring values of a path differ alike; here all others are slightly better on average (by 0.005)
    # with per-example noise of 0.3: within noise, so the default stays.
    noise = rng.normal(-0.005, 0.3, 400)
    noisy = [base + noise * (i != default) for i in range(len(grid))]
    assert choose_l2(grid, noisy) == default
    clear = [base + 0.3 * (i != default + 2) for i in range(len(grid))]
    assert choose_l2(grid, clear) == default + 2
    assert choose_l2((0.5,), [base]) == 0  # a fixed value is simply used


# --- selection and refit, end to end ------------------------------------------------------------------


def test_defaults_refit_on_every_example_and_choose_l2_by_cross_validation() -> None:
    (x, y), (x_test, y_test) = overlapping_task(seed=1, classes=10, per_class=12)
    head = train_head(x, y, 10)
    m = head.metrics
    assert m.train_examples == len(y) == m.validation_examples and m.evaluated_on == "cross_validation"
    assert m.folds == 5 and all(c.train_count == 12 and c.validation_count == 12 for c in m.per_class)
    assert head.selection.l2_source == "cross_validation" and head.selection.l2 in L2_GRID
    assert head.selection.grid[: L2_GRID.index(DEFAULT_L2) + 1] == L2_GRID[: L2_GRID.index(DEFAULT_L2) + 1]
    assert head.held_out is not None and np.array_equal(head.held_out.indices, np.arange(len(y)))
    assert m.accuracy == pytest.approx(np.mean(head.held_out.predictions == y))
    # The refit head is never worse than scikit-learn's default fit on the same examples by more than noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression().fit(x, y).score(x_test, y_test)
    ours = np.mean(HeadModule.from_head(head).predict_proba(x_test).argmax(axis=1) == y_test)
    assert ours >= reference - 0.02

    fixed = train_head(x, y, 10, TrainConfig(l2=3.0))
    assert (fixed.selection.l2, fixed.selection.l2_source, fixed.selection.grid) == (3.0, "caller", (3.0,))
    bare = train_head(x, y, 10, TrainConfig(validation_fraction=0.0))
    assert (bare.selection.l2, bare.selection.l2_source, bare.selection.temperature) == (
        DEFAULT_L2,
        "default",
        1.0,
    )
    assert bare.held_out is None and bare.metrics.evaluated_on == "train" and bare.metrics.folds == 0


# --- calibration --------------------------------------------------------------------------------------


def test_fit_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.5)])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    # Logits unrelated to the labels: the best temperature is as flat as allowed.
    assert fit_temperature(logits, rng.integers(0, 5, 20_000)) > 50


def test_folding_the_temperature_into_the_weights_divides_the_logits() -> None:
    x, y = separable_task(seed=2)
    for kind in ("linear", "mlp"):
        head = train_head(
            x, y, 4, TrainConfig(kind=kind, validation_fraction=0.0, hidden_dim=16, max_epochs=3)
        )
        raw = HeadModule.from_head(head)
        folded = HeadModule.from_state(head.spec, fold_temperature(head.state, kind, 4.0))
        logits = np.log(raw.predict_proba(x).astype(np.float64))
        np.testing.assert_allclose(folded.predict_proba(x), softmax(logits / 4.0), atol=1e-5)
        assert np.array_equal(folded.predict_proba(x).argmax(axis=1), raw.predict_proba(x).argmax(axis=1))


def test_expected_calibration_error_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # Bins: {0.95, 0.95} accuracy 0.5; {0.6} accuracy 1; {0.7} accuracy 1.
    expected = 0.5 * abs(0.95 - 0.5) + 0.25 * abs(0.6 - 1) + 0.25 * abs(0.7 - 1)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_served_probabilities_are_calibrated_on_unseen_examples() -> None:
    (x, y), (x_test, y_test) = overlapping_task(seed=3, classes=20, per_class=15)
    head = train_head(x, y, 20)
    probs = HeadModule.from_head(head).predict_proba(x_test)
    uncalibrated = HeadModule.from_state(
        head.spec, fold_temperature(head.state, "linear", 1 / head.selection.temperature)
    )
    assert head.selection.temperature != 1.0
    assert expected_calibration_error(probs, y_test) < 0.05
    assert expected_calibration_error(probs, y_test) < expected_calibration_error(
        uncalibrated.predict_proba(x_test), y_test
    )
    assert head.metrics.expected_calibration_error is not None and head.metrics.log_loss is not None


# --- the gate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "p"), [(0, 10, 0.3), (3, 16, 0.525), (7, 616, 0.062), (4000, 10_000, 0.41)]
)
def test_binomial_cdf_matches_scipy(k: int, n: int, p: float) -> None:
    assert binomial_cdf(k, n, p) == pytest.approx(float(binom.cdf(k, n, p)), rel=1e-9, abs=1e-300)
    assert binomial_cdf(-1, n, p) == 0.0 and binomial_cdf(n, n, p) == 1.0


def test_active_version_check_is_a_one_sided_mcnemar_test() -> None:
    new = np.array([True] * 60 + [False] * 40)
    active = np.array([True] * 50 + [False] * 10 + [True] * 30 + [False] * 10)
    # Discordant pairs: 10 right only by the new head, 30 only by the active one.
    check = active_version_check(new, active, 3)
    assert check.rule == ACTIVE_VERSION and check.reference_version == 3 and not check.passed
    assert check.p_value == pytest.approx(float(binom.cdf(10, 40, 0.5)))
    assert (check.accuracy, check.reference_accuracy) == (0.6, 0.8)
    assert "significantly worse" in check.detail
    assert active_version_check(active, new, 3).passed  # the other way round it is better
    empty = active_version_check(np.empty(0, bool), np.empty(0, bool), 3)
    assert empty.passed and empty.examples == 0 and "nothing to compare" in empty.detail


def test_shuffled_labels_are_refused_and_real_ones_accepted_on_the_same_inputs() -> None:
    (x, y), _ = overlapping_task(seed=4, classes=40, per_class=8, spread=1.5)
    real = train_head(x, y, 40)
    shuffled = train_head(x, np.random.default_rng(0).permutation(y), 40)
    assert real.baseline_check.passed and not real.metrics.negative_transfer
    assert not shuffled.baseline_check.passed and shuffled.metrics.negative_transfer
