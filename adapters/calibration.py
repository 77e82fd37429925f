"""Probability calibration by one temperature, and the scores that say how honest probabilities are.

Everything here is float64 numpy on logits already computed: a head's held-out (out-of-fold) logits
are at most a few hundred thousand numbers, and the one-dimensional fit takes a few Newton steps.
"""

from __future__ import annotations

import math

import numpy as np

from .spec import head_kind

# A temperature outside these bounds carries no more information than the bound itself: below the
# lower one the top probability is 1 to float32 precision, above the upper one the probabilities
# are uniform to the same precision. Bounding it keeps the weights it is folded into finite and
# their ranking (the predicted label) intact.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3
# Equal-width confidence bins for the expected calibration error (Guo et al., 2017).
ECE_BINS = 15
_NEWTON_STEPS = 50


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def per_example_log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-log p(true label) of each row under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return -log_softmax(scaled)[np.arange(labels.shape[0]), labels]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the mean log loss of softmax(logits / T) on these examples.

    The loss is convex in the inverse temperature b = 1/T, with gradient mean(E_p[z] - z_y) and
    curvature mean(Var_p[z]) >= 0, so Newton's method on b (halving a step that would leave b > 0)
    converges in a handful of steps. The result is clipped to [MIN_TEMPERATURE, MAX_TEMPERATURE]:
    logits that carry no information about the labels drive T to infinity.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"need logits (n, classes) and n labels, got {z.shape} and {y.shape}")
    true = z[np.arange(y.shape[0]), y]
    beta = 1.0
    for _ in range(_NEWTON_STEPS):
        p = np.exp(log_softmax(beta * z))
        expected = (p * z).sum(axis=1)
        gradient = float(np.mean(expected - true))
        curvature = float(np.mean((p * z * z).sum(axis=1) - expected**2))
        if curvature <= 1e-12:
            # Flat: all classes score alike under b; any b is as good as another.
            break
        step = gradient / curvature
        new = beta - step
        if new <= 0:
            new = beta / 2
        done = abs(new - beta) <= 1e-9 * beta
        beta = new
        if done or beta < 1 / MAX_TEMPERATURE:
            break
    return float(min(max(1.0 / beta, MIN_TEMPERATURE), MAX_TEMPERATURE))


def _calibration_terms(p: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prediction: its confidence bin, its top probability and whether the top label is right."""
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; the first bin also takes 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return index, confidence, correct


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |confidence - accuracy| of the top label over equal-width confidence bins, weighted by bin size."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(f"need probabilities (n, classes) and n labels, got {p.shape} and {y.shape}")
    index, confidence, correct = _calibration_terms(p, y, bins)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(total)


def fold_temperature(state: dict[str, np.ndarray], kind: str, temperature: float) -> dict[str, np.ndarray]:
    """The head's weights with 1/T folded into its output layer: softmax(f(x) / T) = softmax(f_T(x)).

    Serving then needs no notion of temperature at all (the grouped head stack, the single-head module
    and every stored version work unchanged), at the cost of the stored weights no longer being the
    optimiser's solution; the manifest records T, so that solution is the stored weights times T.
    """
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    names = head_kind(kind).output
    out = dict(state)
    for name in names:
        out[name] = np.ascontiguousarray(state[name] / np.float32(temperature), dtype=np.float32)
    return out


def laplace_cap(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The accuracy the held-out record supports: (k + 1) / (n + 2) for k right out of n (Laplace's rule of
    succession). 30 right out of 30 supports 31/32 = 0.969, not 1.0."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    k = int(np.sum(p.argmax(axis=1) == y))
    return (k + 1) / (y.size + 2)


def min_temperature(logits: np.ndarray, cap: float, statistic: str = "mean") -> float:
    """The smallest temperature at which the mean (``statistic="max"``: the largest) top probability of
    softmax(logits / T) is at most ``cap``.

    The mean, not the largest: a head may be surer of some inputs than of others, but on average it may not
    claim to be right more often than its record supports. (Holding every held-out prediction to the cap
    was tried: one very confident held-out prediction then raised the temperature of the whole head, and
    the test ECE of a Banking77 8-shot head went from 0.02 to 0.11.) Each row's top probability falls as T
    grows, so their mean does too: bisection on log T within the temperature bounds.
    """
    z = np.asarray(logits, dtype=np.float64)
    below = z - z.max(axis=1, keepdims=True)  # <= 0; the top probability is 1 / sum(exp(below / T))
    reduce = np.mean if statistic == "mean" else np.max

    def mean_top(temperature: float) -> float:
        return float(reduce(1.0 / np.exp(below / temperature).sum(axis=1)))

    if mean_top(MIN_TEMPERATURE) <= cap:
        return MIN_TEMPERATURE
    if mean_top(MAX_TEMPERATURE) > cap:
        return MAX_TEMPERATURE
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    for _ in range(60):
        middle = (low + high) / 2
        if mean_top(math.exp(middle)) > cap:
            low = middle
        else:
            high = middle
    return math.exp(high)


BOOTSTRAP_DRAWS = 200


def bootstrap_interval(
    probabilities: np.ndarray, labels: np.ndarray, score: str, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of ``score`` ('log_loss' or 'ece') over the held-out predictions:
    on a few dozen examples these are estimates with wide errors, and the interval says how wide."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = y.size
    # Per example once; a draw then only sums its examples' terms (copying p for each of 200 draws took
    # 0.36 s of a 10,000-example training).
    if score == "ece":
        index, confidence, correct = _calibration_terms(p, y, ECE_BINS)
    else:
        loss = -np.log(np.maximum(p[np.arange(n), y], 1e-300))
    values = []
    for _ in range(BOOTSTRAP_DRAWS):
        idx = rng.integers(0, n, n)
        if score == "ece":  # the draw's ECE: the sum over bins of |confidence - correct|, over n
            bins = index[idx]
            gap = np.bincount(bins, confidence[idx], ECE_BINS) - np.bincount(bins, correct[idx], ECE_BINS)
            values.append(float(np.abs(gap).sum() / n))
        else:
            values.append(float(loss[idx].mean()))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
