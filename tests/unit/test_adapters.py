"""Unit tests for headswap.adapters: real torch training on small synthetic embedding tasks."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from headswap.adapters import (
    ALPHA,
    HEAD_FORMAT,
    HeadFormatError,
    HeadModule,
    HeadSpec,
    TrainConfig,
    TrainedHead,
    TrainingCancelled,
    TrainingDivergedError,
    TrainingInputError,
    TrainProgress,
    accuracy,
    build_head,
    expected_state_shapes,
    f1_per_label,
    head_from_bytes,
    head_to_bytes,
    macro_f1,
    metrics_from_manifest,
    min_examples_per_class,
    selection_from_manifest,
    stratified_split,
    top_k,
    train_head,
)
from headswap.adapters.ood import REFERENCES_TENSOR

DIM = 384


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(
    rng: np.random.Generator,
    centers: np.ndarray,
    sizes: list[int],
    spread: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around ``centers`` projected onto the unit sphere, like sentence embeddings."""
    xs = [centers[c] + spread * rng.standard_normal((n, centers.shape[1])) for c, n in enumerate(sizes)]
    ys = [np.full(n, c, dtype=np.int64) for c, n in enumerate(sizes)]
    return _unit(np.concatenate(xs)), np.concatenate(ys)


def separable_task(seed: int = 0, classes: int = 4, per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return blobs(rng, rng.standard_normal((classes, DIM)), [per_class] * classes, spread=0.5)


def random_task(seed: int, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((n, DIM))), rng.integers(0, classes, n).astype(np.int64)


def xor_task(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Label = sign(a * b) for (a, b) on a random 2-D plane of the embedding space: not linearly separable."""
    rng = np.random.default_rng(seed)
    ab = rng.uniform(-1, 1, size=(n, 2))
    labels = (ab[:, 0] * ab[:, 1] > 0).astype(np.int64)
    plane = np.linalg.qr(rng.standard_normal((DIM, 2)))[0].T
    x = ab @ plane + 0.05 * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return _unit(x), labels


def states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.fixture(scope="module")
def trained_heads() -> dict[str, TrainedHead]:
    x, y = separable_task(seed=3)
    return {
        "linear": train_head(x, y, 4, TrainConfig(kind="linear")),
        "mlp": train_head(x, y, 4, TrainConfig(kind="mlp", hidden_dim=32, max_epochs=5)),
    }


# --- training quality -----------------------------------------------------------------------------


def test_linear_head_matches_sklearn_logistic_regression() -> None:
    rng = np.random.default_rng(42)
    classes = 20
    centers = rng.standard_normal((classes, DIM))
    spread = 2.7  # heavy overlap: neither model is near 100%, so disagreements would show
    x, y = blobs(rng, centers, [int(n) for n in rng.integers(8, 31, classes)], spread)
    x_test, y_test = blobs(rng, centers, [60] * classes, spread)

    head = train_head(x, y, classes, TrainConfig(kind="linear", validation_fraction=0.0, l2=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is irrelevant to the comparison
        reference = LogisticRegression(C=1.0, max_iter=100).fit(x, y)
        other_c = LogisticRegression(C=0.1, max_iter=100).fit(x, y)

    ours = HeadModule.from_head(head).predict_proba(x_test).argmax(axis=1)
    theirs = reference.predict(x_test)
    ours_acc, theirs_acc = accuracy(y_test, ours), accuracy(y_test, theirs)
    assert 0.5 < theirs_acc < 0.97, "task should be learnable but not trivial"
    assert abs(ours_acc - theirs_acc) <= 0.01
    assert np.mean(ours == theirs) >= 0.97

    # Same optimum, not just similar predictions: l2 must mean exactly 1/C.
    def relative_gap(coef: np.ndarray) -> float:
        return float(np.linalg.norm(head.state["weight"] - coef) / np.linalg.norm(coef))

    assert relative_gap(reference.coef_) < 0.02
    assert relative_gap(other_c.coef_) > 0.3
    assert np.allclose(head.state["bias"] - head.state["bias"].mean(), reference.intercept_, atol=0.02)


def test_binary_linear_head_matches_sklearn_at_the_same_c() -> None:
    # scikit-learn fits one vector w for two classes; the head's W1 - W0 must be that w at l2 = 1/C.
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((2, DIM))
    x, y = blobs(rng, centers, [40, 30], spread=2.7)
    for c in (0.3, 1.0, 10.0):
        head = train_head(x, y, 2, TrainConfig(validation_fraction=0.0, l2=1.0 / c))
        reference = LogisticRegression(C=c, tol=1e-8, max_iter=10_000).fit(x, y)
        w = head.state["weight"][1] - head.state["weight"][0]
        assert np.linalg.norm(w - reference.coef_[0]) / np.linalg.norm(reference.coef_[0]) < 0.02


def test_mlp_learns_what_a_linear_head_cannot() -> None:
    x, y = xor_task(seed=1)
    linear = train_head(x, y, 2, TrainConfig(kind="linear"))
    mlp = train_head(
        x, y, 2, TrainConfig(kind="mlp", hidden_dim=64, learning_rate=1e-2, max_epochs=60, patience=10)
    )
    # Accuracies are cross-validated (out-of-fold) estimates; the served heads are refit on all 600.
    assert mlp.metrics.evaluated_on == linear.metrics.evaluated_on == "cross_validation"
    assert mlp.metrics.train_examples == 600 and mlp.metrics.validation_examples == 600
    assert linear.metrics.accuracy < 0.7
    assert mlp.metrics.accuracy > 0.9
    assert mlp.metrics.accuracy > linear.metrics.accuracy + 0.25


def test_mlp_epochs_are_chosen_on_the_held_out_loss() -> None:
    x, y = random_task(seed=5, n=400, classes=4)
    config = TrainConfig(
        kind="mlp", hidden_dim=64, learning_rate=1e-2, max_epochs=200, patience=3, validation_fraction=0.25
    )
    events: list[TrainProgress] = []
    head = train_head(x, y, 4, config, progress=events.append)
    held = [e for e in events if e.val_loss is not None]
    refit = [e for e in events if e.val_loss is None]
    # The split stopped early on its held-out loss; the refit on every example then ran exactly the
    # epochs that reached the lowest held-out loss.
    assert len(held) < config.max_epochs
    best = 1 + int(np.argmin([e.val_loss for e in held]))
    assert head.metrics.epochs == best == len(refit)
    assert head.metrics.accuracy == pytest.approx(held[best - 1].val_accuracy)
    assert head.metrics.train_examples == 400 and head.metrics.validation_examples == 100


def test_linear_fit_stops_when_lbfgs_converges() -> None:
    x, y = separable_task(seed=5)
    head = train_head(x, y, 4, TrainConfig(l2=1.0, validation_fraction=0.0, max_epochs=200))
    assert head.metrics.stopped_early and head.metrics.epochs < 200


def test_mlp_without_validation_trains_and_reports_train_metrics() -> None:
    x, y = separable_task(seed=4)
    head = train_head(x, y, 4, TrainConfig(kind="mlp", validation_fraction=0.0, max_epochs=30, hidden_dim=32))
    assert head.metrics.evaluated_on == "train"
    assert head.metrics.validation_examples == 0
    assert head.metrics.train_examples == len(y)
    assert head.metrics.accuracy == 1.0


def test_negative_transfer_is_a_statistical_verdict() -> None:
    # 40 classes x 10 examples whose labels have nothing to do with the inputs: with 400 held-out
    # predictions the gate can tell that the head fixes fewer than MIN_SKILL of the baseline's errors.
    x, _ = random_task(seed=7, n=400, classes=40)
    y = np.random.default_rng(7).permutation(np.arange(400) % 40)
    noise = train_head(x, y, 40)
    assert noise.metrics.negative_transfer and not noise.baseline_check.passed
    assert noise.baseline_check.p_value < ALPHA and noise.baseline_check.examples == 400
    assert noise.metrics.majority_baseline_accuracy == noise.baseline_check.reference_accuracy
    assert "negative transfer" in noise.baseline_check.detail

    # Noise with a dominant class: the head is no better than "always class 0", but on 300 examples it is
    # not worse with confidence either, so that is no verdict of negative transfer; the baseline it is
    # measured against is the majority share of the held-out examples.
    rng = np.random.default_rng(7)
    y_dominant = np.where(rng.random(300) < 0.85, 0, rng.integers(1, 3, 300)).astype(np.int64)
    dominant = train_head(_unit(rng.standard_normal((300, DIM))), y_dominant, 3)
    assert dominant.metrics.majority_baseline_accuracy == pytest.approx(np.mean(y_dominant == 0))
    assert dominant.metrics.accuracy <= dominant.metrics.majority_baseline_accuracy + 0.02

    # A learnable set, even a tiny one, is never held back for being small.
    x_good, y_good = separable_task(seed=8)
    assert not train_head(x_good, y_good, 4).metrics.negative_transfer
    x_tiny, y_tiny = separable_task(seed=8, classes=2, per_class=2)
    assert train_head(x_tiny, y_tiny, 2).baseline_check.passed


def test_diverging_training_is_reported() -> None:
    x, y = separable_task(seed=9)
    config = TrainConfig(kind="mlp", l2=1e6, learning_rate=1.0, max_epochs=3, validation_fraction=0.0)
    with pytest.raises(TrainingDivergedError):
        train_head(x, y, 4, config)


# --- determinism, progress, cancellation ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_is_deterministic_for_a_seed(kind: str) -> None:
    x, y = separable_task(seed=10)
    config = TrainConfig(kind=kind, hidden_dim=32, dropout=0.3, max_epochs=4)
    first = train_head(x, y, 4, config)
    with torch.random.fork_rng():
        # Global RNG state must not matter: training uses only its own generators.
        torch.manual_seed(1234)
        torch.rand(100)
        second = train_head(x, y, 4, config)
    assert states_equal(first.state, second.state)
    assert dataclasses.replace(first.metrics, train_seconds=0.0) == dataclasses.replace(
        second.metrics, train_seconds=0.0
    )
    other = train_head(x, y, 4, dataclasses.replace(config, seed=1))
    # The seed deals the folds, so the held-out estimates change with it (the refit of a convex linear
    # head may still land on the same weights).
    if kind == "linear":
        assert first.selection.grid_log_loss != other.selection.grid_log_loss
    else:
        assert not states_equal(first.state, other.state)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_progress_is_reported_and_should_stop_cancels(kind: str) -> None:
    x, y = random_task(seed=11, n=200, classes=3)
    config = TrainConfig(kind=kind, hidden_dim=16, max_epochs=50, patience=50)
    events: list[TrainProgress] = []

    with pytest.raises(TrainingCancelled):
        train_head(x, y, 3, config, progress=events.append, should_stop=lambda: len(events) >= 2)
    assert [e.step for e in events] == [1, 2]
    # Linear: one step per (L2 value, fold), 11 values x 5 folds + the refit; mlp: epochs of 5 folds + refit.
    steps = 11 * 5 + 1 if kind == "linear" else 6 * 50
    assert all(e.steps == steps and e.val_loss is not None and e.val_accuracy is not None for e in events)
    assert all(np.isfinite(e.train_loss) for e in events)

    events.clear()
    train_head(x, y, 3, dataclasses.replace(config, validation_fraction=0.0, max_epochs=2), events.append)
    if kind == "linear":  # without validation: one fit on everything
        assert [(e.step, e.steps, e.val_loss) for e in events] == [(1, 1, None)]
    else:
        assert [(e.step, e.val_loss, e.val_accuracy) for e in events] == [(1, None, None), (2, None, None)]


# --- input validation ------------------------------------------------------------------------------


def test_stratified_split_counts_per_class() -> None:
    sizes = [2, 3, 5, 10, 11, 40]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(labels)
    for fraction, expected_val in [(0.2, [1, 1, 1, 2, 2, 8]), (0.5, [1, 2, 3, 5, 6, 20])]:
        train, val = stratified_split(labels, len(sizes), fraction, seed=3)
        assert np.bincount(labels[val], minlength=len(sizes)).tolist() == expected_val
        assert np.bincount(labels[train], minlength=len(sizes)).tolist() == [
            s - v for s, v in zip(sizes, expected_val, strict=True)
        ]
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
        again_train, again_val = stratified_split(labels, len(sizes), fraction, seed=3)
        assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    _, other_val = stratified_split(labels, len(sizes), 0.5, seed=4)
    assert not np.array_equal(val, other_val)
    train, val = stratified_split(labels, len(sizes), 0.0, seed=0)
    assert val.size == 0 and train.size == len(labels)

    x = _unit(np.random.default_rng(0).standard_normal((len(labels), 8)))
    head = train_head(x, labels, len(sizes), TrainConfig(validation_fraction=0.2))
    assert [c.validation_count for c in head.metrics.per_class] == [1, 1, 1, 2, 2, 8]
    # The split only estimates quality; the served head is refit on every example.
    assert [c.train_count for c in head.metrics.per_class] == sizes
    assert head.metrics.validation_examples == 15 and head.metrics.train_examples == sum(sizes)
    assert head.metrics.evaluated_on == "validation" and head.metrics.folds == 1


def test_min_examples_per_class() -> None:
    assert min_examples_per_class(0.0) == 1
    assert min_examples_per_class(0.2) == 2
    assert min_examples_per_class(None) == 2


def test_too_few_examples_error_names_the_class() -> None:
    x, y = separable_task(seed=12, classes=3, per_class=5)
    y = y.copy()
    y[y == 2] = 0
    y[0] = 2  # class 2 now has a single example
    with pytest.raises(TrainingInputError, match=r"class 2 \('refund'\) has 1 example") as info:
        train_head(x, y, 3, label_names=["billing", "other", "refund"])
    assert info.value.label_index == 2
    # Without validation one example is enough.
    train_head(x, y, 3, TrainConfig(validation_fraction=0.0))
    # A class with no examples at all is named too.
    with pytest.raises(TrainingInputError, match="class 3 has 0 example") as info:
        train_head(x, y, 4, TrainConfig(validation_fraction=0.0))
    assert info.value.label_index == 3


def test_fewer_than_two_classes_is_rejected() -> None:
    x, _ = separable_task(seed=13)
    with pytest.raises(TrainingInputError, match="at least 2 different classes"):
        train_head(x, np.zeros(len(x), dtype=np.int64), 2)
    with pytest.raises(TrainingInputError, match="at least 2 classes"):
        train_head(x, np.zeros(len(x), dtype=np.int64), 1)


def _with_nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[3, 7] = np.nan
    return x


def _with_inf(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[5, 0] = np.inf
    return x


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, y: (_with_nan(x), y), "embedding 3 contains NaN"),
        (lambda x, y: (_with_inf(x), y), "embedding 5 contains NaN or infinite"),
        (lambda x, y: (x[:-1], y), "one label per embedding"),
        (lambda x, y: (x[:, 0], y), "2-D"),
        (lambda x, y: (x, y.astype(np.float32)), "integer"),
        (lambda x, y: (x, np.where(y == 1, 9, y)), "label 9 is outside"),
        (lambda x, y: (x.astype(np.int64), y), "floating point"),
    ],
    ids=["nan", "inf", "length-mismatch", "1d-embeddings", "float-labels", "out-of-range", "int-embeddings"],
)
def test_bad_inputs_are_rejected(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    x, y = separable_task(seed=14)
    bad_x, bad_y = mutate(x, y)
    with pytest.raises(TrainingInputError, match=message):
        train_head(bad_x, bad_y, 4)


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "svm"},
        {"validation_fraction": 0.9},
        {"validation_fraction": -0.1},
        {"l2": -1.0},
        {"l2": float("nan")},
        {"max_epochs": 0},
        {"patience": 0},
        {"learning_rate": 0.0},
        {"batch_size": 0},
        {"hidden_dim": 0},
        {"dropout": 1.0},
        {"seed": -1},
        {"device": "tpu"},
    ],
)
def test_train_config_rejects_out_of_range_values(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [{"kind": "svm"}, {"input_dim": 0}, {"num_classes": 1}, {"hidden_dim": 0}, {"dropout": -0.5}],
)
def test_head_spec_rejects_invalid_values(changes: dict[str, object]) -> None:
    base: dict[str, object] = {"kind": "mlp", "input_dim": 8, "num_classes": 3}
    with pytest.raises(ValueError):
        HeadSpec(**{**base, **changes})  # type: ignore[arg-type]


# --- metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_macro_f1_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y_true = rng.integers(0, 6, n)
    # Labels 6 and 7 may be predicted without ever being true; some true labels may never be predicted.
    y_pred = np.where(rng.random(n) < 0.4, y_true, rng.integers(0, 8, n))
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred) == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    labels = np.arange(8)
    assert np.allclose(
        f1_per_label(y_true, y_pred, labels),
        f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0),
    )


def test_head_metrics_are_consistent(trained_heads: dict[str, TrainedHead]) -> None:
    metrics = trained_heads["linear"].metrics
    # Every class keeps a validation example, so every class is scored and counted in macro_f1.
    f1s = [c.f1 for c in metrics.per_class]
    assert all(f1 is not None for f1 in f1s)
    assert metrics.macro_f1 == pytest.approx(np.mean([f for f in f1s if f is not None]))
    assert [c.label_index for c in metrics.per_class] == [0, 1, 2, 3]
    # Cross-validated: every example has a held-out prediction, and the served head is fit on all of them.
    assert metrics.train_examples == metrics.validation_examples == 80 and metrics.folds == 5
    assert metrics.train_seconds > 0
    assert not metrics.negative_transfer and metrics.accuracy == 1.0


# --- serialization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_serialization_round_trip(trained_heads: dict[str, TrainedHead], kind: str) -> None:
    head = trained_heads[kind]
    weights, manifest = head_to_bytes(head, {"tenant": "acme", "labels": ["a", "b", "c", "d"]})
    manifest = json.loads(json.dumps(manifest))  # what a store would give back
    assert manifest["format"] == HEAD_FORMAT
    assert manifest["tenant"] == "acme"
    loaded = head_from_bytes(weights, manifest)
    assert loaded.spec == head.spec
    assert states_equal(loaded.state, head.state)
    assert metrics_from_manifest(manifest) == head.metrics
    assert selection_from_manifest(manifest) == head.selection
    assert TrainConfig(**manifest["config"]) == head.config

    x, _ = separable_task(seed=16)
    assert np.array_equal(
        HeadModule.from_head(head).predict_proba(x), HeadModule.from_head(loaded).predict_proba(x)
    )


def test_safetensors_payload_holds_only_raw_float32(trained_heads: dict[str, TrainedHead]) -> None:
    head = trained_heads["mlp"]
    weights, _ = head_to_bytes(head)
    (header_len,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    # The weights, and the training embeddings kept for out-of-distribution scores.
    assert set(tensors) == set(expected_state_shapes(head.spec)) | {REFERENCES_TENSOR}
    arrays = {**head.state, REFERENCES_TENSOR: head.ood_references}
    # Header + back-to-back little-endian float32 buffers and nothing else: no room for a pickle.
    offset = 0
    body = weights[8 + header_len :]
    for name, info in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"][0]):
        assert info["dtype"] == "F32"
        start, end = info["data_offsets"]
        assert start == offset
        assert body[start:end] == np.asarray(arrays[name]).astype("<f4").tobytes()
        offset = end
    assert offset == len(body)
    for source in Path(sys.modules["headswap.adapters"].__file__ or "").parent.glob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "torch.load(" not in text and "torch.save(" not in text


def _corrupt(head: TrainedHead, how: str) -> tuple[bytes, dict]:
    weights, manifest = head_to_bytes(head)
    state = dict(head.state)
    if how == "unknown-format":
        manifest["format"] = "headswap.head/99"
    elif how == "truncated":
        weights = weights[: len(weights) - 10]
    elif how == "garbage":
        weights = b"\x80\x04not a safetensors file"
    elif how == "wrong-shape":
        manifest["spec"]["num_classes"] = 5
    elif how == "missing-tensor":
        del state["bias"]
        weights = safetensors.numpy.save(state)
    elif how == "extra-tensor":
        state["extra"] = np.zeros(3, dtype=np.float32)
        weights = safetensors.numpy.save(state)
    elif how == "non-finite":
        state["weight"] = state["weight"].copy()
        state["weight"][0, 0] = np.inf
        weights = safetensors.numpy.save(state)
    elif how == "float64":
        state["weight"] = state["weight"].astype(np.float64)
        weights = safetensors.numpy.save(state)
    elif how == "bad-spec":
        manifest["spec"]["kind"] = "transformer"
    elif how == "no-spec":
        del manifest["spec"]
    return weights, manifest


@pytest.mark.parametrize(
    "how",
    [
        "unknown-format",
        "truncated",
        "garbage",
        "wrong-shape",
        "missing-tensor",
        "extra-tensor",
        "non-finite",
        "float64",
        "bad-spec",
        "no-spec",
    ],
)
def test_corrupted_heads_raise_head_format_error(trained_heads: dict[str, TrainedHead], how: str) -> None:
    weights, manifest = _corrupt(trained_heads["linear"], how)
    with pytest.raises(HeadFormatError):
        head_from_bytes(weights, manifest)


def test_corrupted_metrics_raise_head_format_error(trained_heads: dict[str, TrainedHead]) -> None:
    _, manifest = head_to_bytes(trained_heads["linear"])
    del manifest["metrics"]["accuracy"]
    with pytest.raises(HeadFormatError, match="accuracy"):
        metrics_from_manifest(manifest)
    with pytest.raises(HeadFormatError):
        metrics_from_manifest({"format": HEAD_FORMAT})


def test_extra_manifest_may_not_override_reserved_keys(trained_heads: dict[str, TrainedHead]) -> None:
    with pytest.raises(ValueError, match="reserved"):
        head_to_bytes(trained_heads["linear"], {"spec": {}})
    with pytest.raises(ValueError, match="JSON"):
        head_to_bytes(trained_heads["linear"], {"when": object()})


# --- inference -------------------------------------------------------------------------------------


def test_head_module_predicts_probabilities(trained_heads: dict[str, TrainedHead]) -> None:
    linear = HeadModule.from_head(trained_heads["linear"])
    assert linear.nbytes == (DIM * 4 + 4) * 4
    assert HeadModule.from_head(trained_heads["mlp"]).nbytes > linear.nbytes
    x, y = separable_task(seed=3)
    probs = linear.predict_proba(x)
    assert probs.dtype == np.float32 and probs.shape == (len(x), 4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert accuracy(y, probs.argmax(axis=1)) == 1.0
    assert linear.predict_proba(x[:0]).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        linear.predict_proba(x[:, :10])


def test_head_module_serves_concurrent_requests(trained_heads: dict[str, TrainedHead]) -> None:
    module = HeadModule.from_head(trained_heads["mlp"])
    x, _ = separable_task(seed=17)
    batches = [x[i : i + 7] for i in range(0, len(x), 7)]
    expected = [module.predict_proba(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            results = list(pool.map(module.predict_proba, batches))
            assert all(np.array_equal(r, e) for r, e in zip(results, expected, strict=True))


def test_head_module_from_state_rejects_mismatched_state() -> None:
    spec = HeadSpec(kind="linear", input_dim=8, num_classes=3)
    module = build_head(spec)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert HeadModule.from_state(spec, state).nbytes == (8 * 3 + 3) * 4
    with pytest.raises(ValueError):
        HeadModule.from_state(spec, {"weight": state["weight"]})
    with pytest.raises(ValueError, match="shape"):
        HeadModule.from_state(spec, {"weight": state["weight"].T, "bias": state["bias"]})


def test_top_k_orders_and_clips() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=np.float32)
    indices, values = top_k(probs, 2)
    assert indices.tolist() == [[1, 2], [2, 0]]  # the tie between classes 0 and 1 keeps index order
    assert np.array_equal(values, np.array([[0.6, 0.3], [0.5, 0.25]], dtype=np.float32))
    indices, values = top_k(probs, 10)
    assert indices.shape == (2, 3) and values.shape == (2, 3)
    assert np.all(np.diff(values, axis=1) <= 0)
    single_indices, single_values = top_k(probs[0], 1)
    assert single_indices.tolist() == [1] and single_values.tolist() == [pytest.approx(0.6)]
    with pytest.raises(ValueError):
        top_k(probs, 0)


def test_importing_adapters_pulls_in_no_rpc_machinery() -> None:
    code = (
        "import sys, headswap.adapters\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'grpc' or m.startswith('google.protobuf')"
        " or m.startswith('headswap.server') or m == 'sklearn']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
