"""How a head is evaluated and its regularisation chosen: folds, held-out splits and the L2 grid.

* Small sets are cross-validated: stratified k folds, k = the smallest class's count clipped to
  [2, MAX_FOLDS], so every class has an example in every fold whenever it can.
* Large sets, where k fits of the path would cost more than MAX_CV_WORK allows, hold out
  HOLDOUT_FRACTION of each class instead: with that many examples one split is a precise estimate.
* Either way the head that gets served is refit on every example with the chosen settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_FOLDS = 5
# Cross-validation costs k fits of the whole regularisation path, each proportional to
# examples x classes x embedding dim. Above this many example-classes (~3 s of one CPU core for the
# 5-fold path on 384-d embeddings) one held-out split replaces the folds; by then the split holds
# thousands of predictions, so the estimate it gives is already tight.
MAX_CV_WORK = 100_000
HOLDOUT_FRACTION = 0.2

# L2 strengths (scikit-learn's 1/C) searched from strong to weak, so that each fit starts from the
# previous solution: half-decades from 100 to 0.001. On unit-norm embeddings l2 above 100 leaves
# weights so small that the temperature does all the work, and below 0.001 the optimiser's tolerance,
# not the penalty, decides where a fit on separable examples stops.
L2_GRID: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(4, -7, -1))
# The value used without a held-out estimate, and the one kept unless the data argue otherwise:
# scikit-learn's default C=1.
DEFAULT_L2 = 1.0
# A grid value replaces DEFAULT_L2 only when its held-out log loss is lower by more than this many
# standard errors of the paired per-example difference. On a few dozen examples every value looks
# alike within noise and a plain arg-min would chase it; on hundreds the better value wins clearly.
SELECTION_STANDARD_ERRORS = 2.0
# Walking the path stops once this many successive grid values past DEFAULT_L2 are all worse than
# the best so far: held-out loss along an L2 path is (close to) unimodal.
PATH_PATIENCE = 2


@dataclass(frozen=True)
class Plan:
    """How a training estimates quality: 'cross_validation', 'validation' (one split) or 'train'."""

    method: str
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]  # (fit indices, held-out indices) per fold

    @property
    def held_out(self) -> np.ndarray:
        """Indices with a held-out prediction, sorted."""
        if not self.folds:
            return np.empty(0, dtype=np.int64)
        return np.sort(np.concatenate([held for _, held in self.folds]))


def _validation_count(class_size: int, fraction: float) -> int:
    # Round half up rather than Python's banker's rounding, so that e.g. 0.5 * 5 -> 3 and
    # 0.5 * 7 -> 4 alike; always validate on at least one and train on at least one.
    wanted = max(1, math.floor(fraction * class_size + 0.5))
    return min(wanted, class_size - 1)


def stratified_split(
    labels: np.ndarray, num_classes: int, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (train, validation), class by class.

    Each class ``c`` with ``n_c`` examples puts ``max(1, round(validation_fraction * n_c))`` of them,
    chosen at random with ``numpy.random.default_rng(seed)``, into validation and keeps at least one
    for training. Both index arrays are sorted. With a fraction of 0 validation is empty.
    """
    labels = np.asarray(labels)
    all_indices = np.arange(labels.shape[0], dtype=np.int64)
    if validation_fraction == 0:
        return all_indices, np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    validation: list[np.ndarray] = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            continue
        if members.size < 2:
            raise ValueError(f"class {label} has 1 example; a validation split needs at least 2")
        chosen = rng.permutation(members)[: _validation_count(int(members.size), validation_fraction)]
        validation.append(chosen)
    val_indices = np.sort(np.concatenate(validation)).astype(np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[val_indices] = False
    return all_indices[train_mask], val_indices


def stratified_folds(labels: np.ndarray, num_classes: int, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every example: each class is shuffled and dealt to folds 0, 1, ..., k-1, 0, ...

    Every class starts dealing at fold 0, so every fold holds floor or ceil of n_c / k examples of
    each class and the training part of each fold keeps the class shares of the whole set. Dealing
    each class from a different fold would skew them, and on a few examples per class the held-out
    class would then be the minority of its fold's training set: a bias against the true label that
    drags held-out accuracy below chance on weak signals.
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(labels.shape[0], dtype=np.int64)
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(members.size) % k
    return fold


def plan_evaluation(
    labels: np.ndarray, num_classes: int, validation_fraction: float | None, seed: int
) -> Plan:
    """Folds for ``validation_fraction=None`` (automatic), one split for a fraction > 0, none for 0."""
    if validation_fraction == 0:
        return Plan("train", ())
    n = int(labels.shape[0])
    if validation_fraction is None and n * num_classes > MAX_CV_WORK:
        validation_fraction = HOLDOUT_FRACTION
    if validation_fraction is not None:
        fit, held = stratified_split(labels, num_classes, validation_fraction, seed)
        return Plan("validation", ((fit, held),))
    counts = np.bincount(labels, minlength=num_classes)
    k = int(min(MAX_FOLDS, max(2, counts[counts > 0].min())))
    fold = stratified_folds(labels, num_classes, k, seed)
    everything = np.arange(n, dtype=np.int64)
    return Plan("cross_validation", tuple((everything[fold != f], everything[fold == f]) for f in range(k)))


def choose_l2(grid: tuple[float, ...], losses: list[np.ndarray]) -> int:
    """Index of the chosen value among the ``grid`` values evaluated so far (``losses[i]``: per-example
    held-out log loss at ``grid[i]``): DEFAULT_L2 unless another value is better by more than
    SELECTION_STANDARD_ERRORS paired standard errors; without DEFAULT_L2 in the grid, the arg-min."""
    means = [float(loss.mean()) for loss in losses]
    best = int(np.argmin(means))
    if DEFAULT_L2 not in grid[: len(losses)]:
        return best
    default = grid.index(DEFAULT_L2)
    difference = losses[default] - losses[best]
    n = difference.shape[0]
    if best == default or n < 2:
        return default
    standard_error = float(difference.std(ddof=1)) / math.sqrt(n)
    return best if float(difference.mean()) > SELECTION_STANDARD_ERRORS * standard_error else default


def path_exhausted(grid: tuple[float, ...], means: list[float]) -> bool:
    """True when walking further down ``grid`` cannot pay: DEFAULT_L2 is behind us and the last
    PATH_PATIENCE values were all worse than the best so far."""
    done = len(means)
    if done < PATH_PATIENCE + 1 or (DEFAULT_L2 in grid and grid.index(DEFAULT_L2) >= done):
        return False
    best = min(means)
    return all(m > best for m in means[-PATH_PATIENCE:])
