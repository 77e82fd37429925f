"""Training options, the errors a training raises, and the checks its inputs must pass."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .spec import HEAD_KINDS

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MAX_SEED = 2**63 - 1
# Far past any useful penalty (selection.L2_GRID stops at 100: at 1e6 the weights are all but zero), and far
# below where float32 arithmetic overflows in the solver (1e30 made the linear head's fit fail).
MAX_L2 = 1e6


class TrainingInputError(ValueError):
    """The examples cannot be trained on as given; the message says why in user-facing terms."""

    def __init__(self, message: str, label_index: int | None = None) -> None:
        super().__init__(message)
        # The offending class, when the problem is one class's examples, so callers can map it
        # back to their own label name.
        self.label_index = label_index


class TrainingCancelled(Exception):
    """``should_stop()`` asked training to end; nothing was produced."""


class TrainingDivergedError(RuntimeError):
    """The optimiser produced non-finite weights (for the mlp, usually a too-large learning rate)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one head. The defaults need nothing but examples."""

    # Head architecture, one of HEAD_KINDS.
    kind: str = "linear"
    # None (default): choose settings and estimate quality by stratified k-fold cross-validation, or on
    # a held-out split for large sets (see selection.py), then refit on every example. A fraction in
    # (0, 0.9) holds out that share of each class instead of cross-validating, then refits on every
    # example too. 0 skips validation altogether: no search, no calibration, metrics measured on the
    # training examples (optimistic).
    validation_fraction: float | None = None
    # Seeds the folds or split, weight initialisation, shuffling and dropout. Equal seeds give
    # bit-identical heads on CPU.
    seed: int = 0
    # L2 penalty strength, scikit-learn's 1/C: the linear head minimises
    # sum_i CE_i + (l2 / 2) * ||W||^2 (bias unpenalised). For the mlp it sets AdamW's weight decay
    # to l2 / n. None: the linear head searches selection.L2_GRID on the held-out predictions;
    # the mlp (and any head trained without validation) uses selection.DEFAULT_L2.
    l2: float | None = None
    # Upper bound on epochs: passes over the examples for the mlp, chunks of
    # LBFGS_ITERATIONS_PER_EPOCH L-BFGS iterations for each fit of the linear head.
    max_epochs: int = 100
    # mlp: epochs without a new best held-out loss (training loss without validation) before a fold stops.
    patience: int = 5
    # AdamW step size, in (0, 1]; mlp only (L-BFGS's strong-Wolfe line search chooses its own steps).
    learning_rate: float = 1e-3
    # Minibatch size; mlp only (the linear head is optimised full-batch).
    batch_size: int = 64
    # Width of the mlp's hidden layer; mlp only.
    hidden_dim: int = 256
    # Dropout after the mlp's hidden activation; mlp only.
    dropout: float = 0.1
    # "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        fraction = self.validation_fraction
        if fraction is not None and (not _is_real(fraction) or not 0.0 <= fraction < 0.9):
            raise ValueError(f"validation_fraction must be at least 0 and below 0.9, got {fraction!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        if self.l2 is not None and (not _is_real(self.l2) or not 0 <= self.l2 <= MAX_L2):
            raise ValueError(
                f"l2 must be between 0 and {MAX_L2:g} (0: chosen by validation), got {self.l2!r}"
            )
        if not _is_int(self.max_epochs) or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if not _is_int(self.patience) or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")
        # Above 1 an Adam step moves every weight by up to lr: never useful, and past float32's
        # range it fails inside the optimiser instead of here.
        if not _is_real(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be above 0 and at most 1, got {self.learning_rate!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.hidden_dim) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be an integer >= 1, got {self.hidden_dim!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be at least 0 and below 1, got {self.dropout!r}")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


def min_examples_per_class(validation_fraction: float | None) -> int:
    """Examples every class needs: one to train on, plus one to hold out unless validation is off."""
    return 1 if validation_fraction == 0 else 2


def _describe_class(label: int, label_names: Sequence[str] | None) -> str:
    if label_names is not None and 0 <= label < len(label_names):
        return f"class {label} ({label_names[label]!r})"
    return f"class {label}"


def validate_inputs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    label_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 embeddings, int64 labels), or TrainingInputError saying what is wrong."""
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise TrainingInputError(f"embeddings must be a non-empty 2-D array (n, dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TrainingInputError(f"embeddings must be floating point, got dtype {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TrainingInputError(f"labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise TrainingInputError(
            f"got {x.shape[0]} embeddings but {y.shape[0]} labels; there must be one label per embedding"
        )
    if not _is_int(num_classes) or num_classes < 2:
        raise TrainingInputError(f"a head needs at least 2 classes, got num_classes={num_classes!r}")
    if y.min() < 0 or y.max() >= num_classes:
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise TrainingInputError(f"label {bad} is outside the valid range 0..{num_classes - 1}")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x32)):
        row = int(np.flatnonzero(~np.all(np.isfinite(x32), axis=1))[0])
        raise TrainingInputError(f"embedding {row} contains NaN or infinite values (or overflows float32)")
    counts = np.bincount(y, minlength=num_classes)
    present = int(np.count_nonzero(counts))
    if present < 2:
        raise TrainingInputError(f"training needs examples of at least 2 different classes, got {present}")
    needed = min_examples_per_class(config.validation_fraction)
    short = [label for label in range(num_classes) if counts[label] < needed]
    if short:
        first = short[0]
        others = f" (and {len(short) - 1} more class(es))" if len(short) > 1 else ""
        why = "one to train on and one to hold out" if needed > 1 else "at least one to train on"
        raise TrainingInputError(
            f"{_describe_class(first, label_names)} has {int(counts[first])} example(s){others}; "
            f"each class needs at least {needed} ({why})",
            label_index=first,
        )
    return x32, y.astype(np.int64)
