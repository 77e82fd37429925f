"""Out-of-distribution scores: how unlike a head's training examples an input is.

The score of an input is its cosine distance to the nearest stored training example,
``1 - max_j cos(x, r_j)`` (0: identical to an example; up to 2). It was chosen by measurement on held-out
Banking77 data against class-centroid distance and the mean distance to the k nearest examples (see
docs/BENCHMARKS.md, "Out-of-distribution scores"): the nearest example keeps the shape of each class
(several phrasings of one intent are several clusters, which a centroid averages away) and needs no
density model.

A head stores its normalised training embeddings, up to ``MAX_REFERENCES_PER_CLASS`` per class (chosen
evenly at random with the training seed when a class has more), beside its weights: 4 bytes a dimension
an example (1.5 KiB for a 384-d text example, 5 KiB for a 1280-d image one). Scoring one input costs one
dot product per stored example of its own head, nothing per other tenant.

The threshold is learned on the same folds as the L2 and temperature choice: each held-out example is
scored against the references of the examples its fold was fit on, and the threshold is the
``OOD_QUANTILE`` quantile of those in-domain distances (floored, for small sets, by a normal prediction
bound: see learn_threshold), so that about 5% of in-domain inputs or fewer are flagged. Scores on folds are slightly pessimistic (each fold's references lack that fold's examples), so
the served head, which has every example, flags a little less of its own domain than reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .selection import Plan

# Stored examples per class, at most: enough for Banking77's full training set to keep nearly all of its
# AUROC (measured: see docs/BENCHMARKS.md) at 96 KiB a class on 384-d embeddings.
MAX_REFERENCES_PER_CLASS = 64
# A held-out in-domain example is above the threshold at most 1 - OOD_QUANTILE of the time.
OOD_QUANTILE = 0.95
NORMAL_95 = 1.6448536  # the standard normal's 95% quantile
# The weights file's tensor of stored examples.
REFERENCES_TENSOR = "ood.references"
# What the manifest's "ood" object names the score.
OOD_SCORE = "nearest_example_cosine_distance"


@dataclass(frozen=True)
class OODModel:
    references: np.ndarray  # float32 (m, dim), unit rows
    threshold: float | None  # None without held-out predictions
    flagged_share: float | None  # of the held-out in-domain examples, under that threshold
    held_out: int  # held-out distances the threshold was learned from


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def select_references(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of the examples kept: every example of a class with at most ``per_class``, else a
    random ``per_class`` of them (numpy's default_rng(seed))."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if members.size > per_class:
            members = rng.choice(members, per_class, replace=False)
        kept.append(members)
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.empty(0, np.int64)


def nearest_distance(references: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1 - the cosine similarity of each row of ``x`` to its nearest reference (unit rows)."""
    if references.shape[0] == 0:
        return np.full(x.shape[0], np.nan, dtype=np.float32)
    similarity = normalize_rows(x) @ references.T
    return np.asarray(1.0 - similarity.max(axis=1), dtype=np.float32)


def learn_threshold(distances: np.ndarray) -> tuple[float, float]:
    """(threshold, share of ``distances`` above it): the larger of the empirical OOD_QUANTILE quantile
    (rounded up to an observed distance) and the normal 95% one-sided prediction bound
    mean + 1.645 sd sqrt(1 + 1/n).

    On thousands of held-out distances the two agree. On 30 the empirical quantile is the second largest
    distance and swings from draw to draw: measured on 3-label 10-shot Banking77 heads it flagged 8-11% of
    in-domain test sentences (5% intended); the prediction bound brings that to about 7% (docs/BENCHMARKS.md).
    """
    d = np.asarray(distances, dtype=np.float64)
    threshold = float(np.quantile(d, OOD_QUANTILE, method="higher"))
    if d.size > 1:
        bound = float(d.mean() + NORMAL_95 * d.std(ddof=1) * np.sqrt(1 + 1 / d.size))
        threshold = max(threshold, bound)
    return threshold, float(np.mean(d > threshold))


def fit_ood(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    plan: Plan,
    seed: int,
    per_class: int = MAX_REFERENCES_PER_CLASS,
) -> OODModel:
    """The references of the served head (from every example) and the threshold from ``plan``'s folds."""
    unit = normalize_rows(x)
    references = unit[select_references(y, num_classes, per_class, seed)]
    if not plan.folds:
        return OODModel(references, None, None, 0)
    distances = np.empty(x.shape[0], dtype=np.float32)
    for fit_idx, held_idx in plan.folds:
        fold_refs = unit[fit_idx[select_references(y[fit_idx], num_classes, per_class, seed)]]
        distances[held_idx] = nearest_distance(fold_refs, unit[held_idx])
    held = distances[plan.held_out]
    threshold, share = learn_threshold(held)
    return OODModel(references, threshold, share, int(held.size))
