"""Classification metrics in plain numpy (scikit-learn is a test-only dependency)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _check_pair(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.ndim != 1 or pred.shape != true.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {true.shape} and {pred.shape}")
    if true.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    return true, pred


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Fraction of exact matches."""
    true, pred = _check_pair(y_true, y_pred)
    return float(np.mean(true == pred))


def f1_per_label(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, labels: npt.ArrayLike) -> np.ndarray:
    """F1 of each label in ``labels``; 0.0 where precision and recall are both undefined or zero.

    Matches scikit-learn's ``f1_score(average=None, zero_division=0)`` (its default, minus the warning).
    """
    true, pred = _check_pair(y_true, y_pred)
    label_array = np.asarray(labels)
    scores = np.zeros(label_array.shape[0], dtype=np.float64)
    for i, label in enumerate(label_array):
        is_true = true == label
        is_pred = pred == label
        tp = int(np.count_nonzero(is_true & is_pred))
        # 2tp / (2tp + fp + fn) is algebraically 2PR/(P+R) and has no 0/0 except when tp=fp=fn=0.
        denominator = int(np.count_nonzero(is_true)) + int(np.count_nonzero(is_pred))
        scores[i] = 2.0 * tp / denominator if denominator else 0.0
    return scores


def macro_f1(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Unweighted mean F1 over the labels that occur in ``y_true`` or ``y_pred``.

    That label set is scikit-learn's default for ``f1_score(average="macro")``: a class that is
    neither present nor predicted does not drag the mean down, one that is only predicted does.
    """
    true, pred = _check_pair(y_true, y_pred)
    labels = np.union1d(true, pred)
    return float(np.mean(f1_per_label(true, pred, labels)))
