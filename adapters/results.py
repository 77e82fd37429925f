"""What a training produces: the head, its held-out metrics, the settings chosen and the gate's verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .gate import GateCheck
from .spec import HeadSpec

if TYPE_CHECKING:
    from .config import TrainConfig

EVALUATED_ON = ("cross_validation", "validation", "train")


@dataclass(frozen=True)
class TrainProgress:
    """Reported after each step, from the training thread. A step is one fit of one L2 value on one
    fold (linear) or one epoch (mlp); the final refit on every example is the last step(s)."""

    step: int  # 1-based
    steps: int  # an upper bound: the linear path may stop early, the mlp's folds may stop early
    # Mean cross-entropy on the examples being fit, without the penalty (for the mlp averaged over the
    # epoch's minibatches, with dropout active).
    train_loss: float
    val_loss: float | None  # on the step's held-out fold; None for the refit
    val_accuracy: float | None


@dataclass(frozen=True)
class ClassMetrics:
    label_index: int
    train_count: int  # examples of the class the served head was fit on
    validation_count: int  # held-out predictions of the class behind the metrics
    # F1 on the held-out predictions; None when the class neither occurs there nor is predicted there,
    # in which case it is also left out of macro_f1.
    f1: float | None


@dataclass(frozen=True)
class HeadMetrics:
    """Estimates of the served head's quality from predictions on examples held out of the fit that
    made them: out-of-fold ("cross_validation"), one held-out split ("validation"), or, when the caller
    asked for no validation, the training examples themselves ("train", optimistic)."""

    evaluated_on: str  # one of EVALUATED_ON
    accuracy: float
    macro_f1: float
    # Accuracy of always answering the most frequent label of the examples each prediction was fit on.
    majority_baseline_accuracy: float
    # The gate's majority-baseline rule failed: with confidence, the head is no better than the baseline.
    negative_transfer: bool
    per_class: tuple[ClassMetrics, ...]  # one per class, by label index
    epochs: int  # of the final fit (linear: chunks of 10 L-BFGS iterations)
    # Wall time of the whole train_head call (model selection, calibration and refit included).
    train_seconds: float
    train_examples: int  # examples the served head was fit on: all of them
    validation_examples: int  # held-out predictions behind the metrics (every example under cross-validation)
    # The final fit ended before max_epochs: patience ran out, or the linear head's L-BFGS converged.
    stopped_early: bool
    folds: int = 0  # cross-validation folds; 1 for a held-out split, 0 without validation
    # On the held-out predictions, with the calibrated probabilities that Classify serves; None for
    # versions trained before these were recorded.
    log_loss: float | None = None
    expected_calibration_error: float | None = None
    # 95% percentile-bootstrap intervals of the two over the held-out predictions: on a few dozen examples
    # the point values are noisy (30 right answers give a log loss near 0 that means little).
    log_loss_interval: tuple[float, float] | None = None
    expected_calibration_error_interval: tuple[float, float] | None = None
    # Out-of-distribution threshold learned on the held-out folds (adapters/ood.py), and the share of the
    # held-out in-domain examples above it; None without held-out predictions or for older versions.
    ood_threshold: float | None = None
    ood_flagged_share: float | None = None
    # The top probability the held-out record supports (calibration.laplace_cap); the temperature was
    # raised, if need be, so that no held-out prediction claims more. None for older versions.
    confidence_cap: float | None = None


@dataclass(frozen=True)
class Selection:
    """The settings chosen for the final fit, and why."""

    l2: float
    # "cross_validation" or "validation" (searched), "caller" (fixed in the request) or "default".
    l2_source: str
    # Divides the logits of the served head (already folded into its stored weights): fitted on the
    # held-out logits, 1.0 without them.
    temperature: float
    grid: tuple[float, ...] = ()  # L2 values tried, strong to weak
    grid_log_loss: tuple[float, ...] = ()  # mean held-out log loss at each, after its own temperature
    # The temperature the held-out log loss chose, before the confidence cap raised it (if it did).
    fitted_temperature: float | None = None


@dataclass(frozen=True)
class HeldOut:
    """The held-out prediction of each example that has one (what the gate compares)."""

    indices: np.ndarray  # int64 example indices, sorted
    predictions: np.ndarray  # int64 label index predicted for each


@dataclass(frozen=True)
class TrainedHead:
    spec: HeadSpec
    state: dict[str, np.ndarray]  # float32 weights (temperature folded in), CPU, like build_head(spec)
    metrics: HeadMetrics
    config: TrainConfig
    selection: Selection
    held_out: HeldOut | None  # None when trained without validation
    baseline_check: GateCheck  # the gate's majority-baseline rule
    # Unit-norm training embeddings kept for out-of-distribution scores (adapters/ood.py), float32 (m, dim).
    ood_references: np.ndarray | None = None
