"""The promotion gate: exact one-sided binomial tests on held-out predictions.

A new head version is held back only on strong evidence, because holding back a tenant's first head
leaves it with nothing to answer:

* ``majority_baseline``: negative transfer. H0: the head fixes at least ``MIN_SKILL`` of the errors
  of always answering the majority label, i.e. its accuracy is at least
  ``base + MIN_SKILL * (1 - base)``. The head is held back when an exact binomial test on its number
  of correct held-out predictions rejects H0 at level ``ALPHA``. A head trained on labels that have
  nothing to do with the inputs is rejected once there are enough examples to tell (a few hundred);
  a real head on a handful of examples is never rejected for being merely uncertain. A test of
  "significantly better than the baseline" could not do both: a weak but real head on 16 examples
  is not significantly better than chance, and a head on shuffled labels is not significantly worse.
* ``active_version``: the new head against the tenant's active one on the same examples, which the
  active one never saw. A one-sided exact McNemar test on the discordant pairs (b: only the new head
  right, c: only the active one right; under H0 "equally accurate" b ~ Binomial(b + c, 1/2)); the new
  head is held back when it is significantly worse at level ``ALPHA``.

Pure Python and numpy: the binomial tail is summed in log space with ``math.lgamma``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.01
# The smallest share of the majority baseline's errors a head must be expected to fix to count as
# transfer at all (a Cohen's-kappa-like skill against the majority label).
MIN_SKILL = 0.05

MAJORITY_BASELINE = "majority_baseline"
ACTIVE_VERSION = "active_version"


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate, with the numbers it was decided on."""

    rule: str  # MAJORITY_BASELINE or ACTIVE_VERSION
    passed: bool
    p_value: float  # one-sided; the rule fails when p_value < ALPHA
    examples: int  # held-out predictions compared
    accuracy: float  # the new head's accuracy on them
    reference_accuracy: float  # the baseline's, or the active version's, on the same examples
    reference_version: int  # the active version compared with; 0 for the baseline
    detail: str  # one sentence a person can act on


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact, summed in log space (stable for n in the millions)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    terms = [
        log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return float(min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms)))


def majority_baseline_check(correct: np.ndarray, baseline_correct: np.ndarray, what: str) -> GateCheck:
    """Negative transfer test on held-out predictions; ``correct``/``baseline_correct`` are boolean per
    example (head right, majority label right); ``what`` names the held-out estimate in the detail."""
    n = int(correct.shape[0])
    if n == 0:
        raise ValueError("the gate needs at least one held-out prediction")
    hits = int(np.count_nonzero(correct))
    accuracy = hits / n
    base = float(np.mean(baseline_correct))
    bar = base + MIN_SKILL * (1.0 - base)
    p_value = binomial_cdf(hits, n, bar)
    passed = p_value >= ALPHA
    detail = (
        f"{what} accuracy {accuracy:.3f} on {n} examples against {base:.3f} for always answering the "
        f"majority label: "
    )
    if passed:
        detail += "no evidence of negative transfer"
    else:
        detail += (
            f"with p = {p_value:.2g} the head fixes fewer than {MIN_SKILL:.0%} of the baseline's errors "
            "(negative transfer); check the labels, add examples, or force_activate"
        )
    return GateCheck(MAJORITY_BASELINE, passed, p_value, n, accuracy, base, 0, detail)


def active_version_check(correct: np.ndarray, active_correct: np.ndarray, active_version: int) -> GateCheck:
    """Paired comparison with the active version on examples it was not trained on."""
    n = int(correct.shape[0])
    if n == 0:
        return GateCheck(
            ACTIVE_VERSION,
            True,
            1.0,
            0,
            0.0,
            0.0,
            active_version,
            f"no examples that version {active_version} was not trained on: nothing to compare",
        )
    only_new = int(np.count_nonzero(correct & ~active_correct))
    only_active = int(np.count_nonzero(~correct & active_correct))
    p_value = binomial_cdf(only_new, only_new + only_active, 0.5)
    passed = p_value >= ALPHA
    accuracy, reference = float(np.mean(correct)), float(np.mean(active_correct))
    detail = (
        f"held-out accuracy {accuracy:.3f} against {reference:.3f} for active version {active_version} on "
        f"{n} examples it was not trained on ({only_new} right only by the new head, {only_active} only by "
        f"version {active_version}): "
    )
    if passed:
        detail += "not significantly worse"
    else:
        detail += f"significantly worse (p = {p_value:.2g}); check the new labels, or force_activate to promote it anyway"
    return GateCheck(ACTIVE_VERSION, passed, p_value, n, accuracy, reference, active_version, detail)
