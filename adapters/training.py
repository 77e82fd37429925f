"""Training of tenant heads on cached backbone embeddings.

Two recipes share one entry point, :func:`train_head`:

* ``linear``: multinomial logistic regression with exactly scikit-learn's objective, optimised
  full-batch with L-BFGS, so that ``l2`` means ``1/C`` and results can be checked against sklearn.
* ``mlp``: one hidden layer trained with AdamW on shuffled minibatches.

Both hold out a stratified validation split (unless ``validation_fraction == 0``), stop early on
validation loss, keep the best weights and report metrics measured on the held-out examples.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .heads import HEAD_KINDS, HeadSpec, MLPHead, build_head
from .metrics import accuracy, f1_per_label, macro_f1

# L-BFGS iterations that make up one "epoch" of the linear recipe: small enough that early
# stopping, progress reports and cancellation react quickly, large enough that the per-chunk
# bookkeeping (a validation pass, a weight copy) is negligible next to the optimisation.
LBFGS_ITERATIONS_PER_EPOCH = 10
# The linear recipe has converged when one chunk improves the objective by less than this,
# relative to its value.
LBFGS_GRADIENT_TOLERANCE = 1e-4
LBFGS_RELATIVE_TOLERANCE = 1e-6
# scikit-learn's lbfgs solver goes through scipy with maxcor=10; the same history keeps the two
# optimisers' trajectories close.
_LBFGS_HISTORY = 10

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MAX_SEED = 2**63 - 1


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
    """How to train one head. Every field has a default that suits ~10-1000 examples per tenant."""

    # Head architecture, one of HEAD_KINDS.
    kind: str = "linear"
    # Share of each class held out for early stopping and for the reported metrics. 0 trains on
    # everything; metrics are then measured on the training examples and are optimistic.
    validation_fraction: float = 0.2
    # Seeds the validation split, weight initialisation, shuffling and dropout. Equal seeds give
    # bit-identical heads on CPU.
    seed: int = 0
    # L2 penalty strength, scikit-learn's 1/C: the linear head minimises
    # sum_i CE_i + (l2 / 2) * ||W||^2 (bias unpenalised). For the mlp it sets AdamW's weight decay
    # to l2 / n_train (see _train_mlp).
    l2: float = 1.0
    # Upper bound on epochs: passes over the training examples for the mlp, chunks of
    # LBFGS_ITERATIONS_PER_EPOCH L-BFGS iterations for the linear head.
    max_epochs: int = 100
    # Epochs without a new best validation loss (training loss without a validation split)
    # before training stops.
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
        if not _is_real(self.validation_fraction) or not 0.0 <= self.validation_fraction < 0.9:
            raise ValueError(
                f"validation_fraction must be at least 0 and below 0.9, got {self.validation_fraction!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        if not _is_real(self.l2) or self.l2 < 0:
            raise ValueError(f"l2 must be a finite number >= 0, got {self.l2!r}")
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


_DEFAULT_CONFIG = TrainConfig()


@dataclass(frozen=True)
class TrainProgress:
    """Reported once per epoch, from the training thread."""

    epoch: int  # 1-based
    max_epochs: int
    # Mean cross-entropy on the training examples, without the penalty. For the mlp it is
    # averaged over the epoch's minibatches (with dropout active), for the linear head it is
    # measured after the chunk.
    train_loss: float
    val_loss: float | None  # None without a validation split
    val_accuracy: float | None


@dataclass(frozen=True)
class ClassMetrics:
    label_index: int
    train_count: int
    validation_count: int
    # F1 on the evaluation set; None when the class neither occurs there nor is predicted there,
    # in which case it is also left out of macro_f1.
    f1: float | None


@dataclass(frozen=True)
class HeadMetrics:
    evaluated_on: str  # "validation", or "train" when validation_fraction == 0
    accuracy: float
    macro_f1: float
    # Accuracy of always predicting the most frequent TRAINING class, measured on the same
    # evaluation set.
    majority_baseline_accuracy: float
    # accuracy <= majority_baseline_accuracy: the head is no better than ignoring the input.
    negative_transfer: bool
    per_class: tuple[ClassMetrics, ...]  # one per class, by label index
    epochs: int  # epochs actually run
    # Wall time of the whole train_head call (validation, splitting and evaluation included).
    train_seconds: float
    train_examples: int
    validation_examples: int
    # Training ended before max_epochs: patience ran out, or the linear head's L-BFGS converged.
    stopped_early: bool


@dataclass(frozen=True)
class TrainedHead:
    spec: HeadSpec
    state: dict[str, np.ndarray]  # float32 weights, CPU, keyed like build_head(spec).state_dict()
    metrics: HeadMetrics
    config: TrainConfig


def min_examples_per_class(validation_fraction: float) -> int:
    """Examples every class needs: one to train on, plus one to validate on when validating."""
    return 1 if validation_fraction == 0 else 2


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
            raise TrainingInputError(
                f"class {label} has 1 example; a validation split needs at least 2", label_index=label
            )
        chosen = rng.permutation(members)[: _validation_count(int(members.size), validation_fraction)]
        validation.append(chosen)
    val_indices = np.sort(np.concatenate(validation)).astype(np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[val_indices] = False
    return all_indices[train_mask], val_indices


def _describe_class(label: int, label_names: Sequence[str] | None) -> str:
    if label_names is not None and 0 <= label < len(label_names):
        return f"class {label} ({label_names[label]!r})"
    return f"class {label}"


def _validate_inputs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    label_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
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
        why = "one to train on and one to validate on" if needed > 1 else "at least one to train on"
        raise TrainingInputError(
            f"{_describe_class(first, label_names)} has {int(counts[first])} example(s){others}; "
            f"each class needs at least {needed} ({why})",
            label_index=first,
        )
    return x32, y.astype(np.int64)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available")
    return torch.device(name)


@dataclass
class _Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None


class _BestWeights:
    """Tracks the lowest monitored loss, the weights that produced it and the epochs since."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_without_improvement = 0

    def update(self, loss: float, module: nn.Module, keep_weights: bool) -> bool:
        """Record one epoch; True when patience has run out."""
        # NaN compares False, so a diverging epoch counts as "no improvement" and is never kept.
        if loss < self.best_loss:
            self.best_loss = loss
            self.epochs_without_improvement = 0
            if keep_weights:
                self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience

    def restore(self, module: nn.Module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


def _cross_entropy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``module`` in eval mode, without gradients."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(x)
        loss = float(F.cross_entropy(logits, y).item())
        acc = float((logits.argmax(dim=1) == y).to(torch.float64).mean().item())
    module.train(was_training)
    return loss, acc


def _check_cancel(should_stop: Callable[[], bool] | None, epochs_done: int) -> None:
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training was cancelled after {epochs_done} epoch(s)")


def _train_linear(
    spec: HeadSpec,
    data: _Data,
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[nn.Module, int, bool]:
    linear = build_head(spec)
    assert isinstance(linear, nn.Linear)
    device = data.x_train.device
    # float32, like scikit-learn on float32 embeddings: at gtol 1e-4 the curvature pairs and the line
    # search have all the precision they need, and each pass costs half of float64's.
    linear = linear.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        # sklearn starts from zero; so does this, which also makes the linear head seed-independent
        # (the seed then only chooses the validation split).
        linear.weight.zero_()
        linear.bias.zero_()
    x_train = data.x_train.to(torch.float32)
    x_val = data.x_val.to(torch.float32) if data.x_val is not None else None
    y_train = data.y_train
    n_train = x_train.shape[0]
    # sklearn's objective divided by n_train: same minimiser, but gradients of order 1 keep
    # L-BFGS's absolute tolerances meaningful whatever the number of examples.
    penalty = config.l2 / (2.0 * n_train)

    def objective() -> torch.Tensor:
        data_loss = F.cross_entropy(linear(x_train), y_train)
        return data_loss + penalty * linear.weight.pow(2).sum()

    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=LBFGS_ITERATIONS_PER_EPOCH,
        history_size=_LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
        # scikit-learn's stopping test (gtol = tol = 1e-4 on the same n-scaled objective): L-BFGS stops
        # inside a chunk as soon as it passes, instead of polishing an optimum no prediction depends on.
        tolerance_grad=LBFGS_GRADIENT_TOLERANCE,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.no_grad():
        previous = float(objective().item())
    tracker = _BestWeights(config.patience)
    epoch = 0
    stopped_early = False
    for epoch in range(1, config.max_epochs + 1):
        _check_cancel(should_stop, epoch - 1)
        optimizer.step(closure)  # type: ignore[no-untyped-call]
        # One forward and backward pass gives the objective, the training loss and the gradient test.
        optimizer.zero_grad()
        data_loss = F.cross_entropy(linear(x_train), y_train)
        total = data_loss + penalty * linear.weight.pow(2).sum()
        total.backward()  # type: ignore[no-untyped-call]
        current = float(total.item())
        train_loss = float(data_loss.item())
        grad_max = max(float(p.grad.abs().max()) for p in linear.parameters() if p.grad is not None)
        val_loss: float | None = None
        val_accuracy: float | None = None
        patience_out = False
        if x_val is not None and data.y_val is not None:
            val_loss, val_accuracy = _cross_entropy(linear, x_val, data.y_val)
            patience_out = tracker.update(val_loss, linear, keep_weights=True)
        if progress is not None:
            progress(TrainProgress(epoch, config.max_epochs, train_loss, val_loss, val_accuracy))
        if not math.isfinite(current):
            break
        converged = grad_max <= LBFGS_GRADIENT_TOLERANCE or abs(previous - current) <= (
            LBFGS_RELATIVE_TOLERANCE * abs(previous)
        )
        previous = current
        if converged or patience_out:
            stopped_early = epoch < config.max_epochs
            break
    # Without a validation split the last weights are the (converged) optimum of the objective.
    tracker.restore(linear)
    return linear, epoch, stopped_early


def _train_mlp(
    spec: HeadSpec,
    data: _Data,
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[nn.Module, int, bool]:
    device = data.x_train.device
    # Independent streams for initialisation+shuffling and for dropout, all private to this call:
    # the global RNG is shared with every other thread of the server, so seeding it would neither
    # be reproducible under concurrency nor free of side effects for callers.
    init_seed, dropout_seed = np.random.SeedSequence(config.seed).generate_state(2, dtype=np.uint32)
    cpu_generator = torch.Generator().manual_seed(int(init_seed))
    module = build_head(spec, generator=cpu_generator).to(device)
    assert isinstance(module, MLPHead)
    module.dropout.generator = torch.Generator(device=device).manual_seed(int(dropout_seed))

    n_train = data.x_train.shape[0]
    # AdamW's decoupled decay shrinks weights by lr * weight_decay per step. With
    # weight_decay = l2 / n_train that is the shrinkage plain gradient descent on the linear
    # head's objective (mean CE + l2 / (2 n) * ||W||^2) would apply, so l2 keeps one meaning
    # across kinds and weakens as examples accumulate. Biases are not decayed, as for the linear head.
    decayed = [p for p in module.parameters() if p.ndim > 1]
    not_decayed = [p for p in module.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.l2 / n_train},
            {"params": not_decayed, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    has_validation = data.x_val is not None and data.y_val is not None
    tracker = _BestWeights(config.patience)
    epoch = 0
    stopped_early = False
    for epoch in range(1, config.max_epochs + 1):
        _check_cancel(should_stop, epoch - 1)
        module.train()
        # The permutation is drawn on CPU so that it is identical whatever the device.
        order = torch.randperm(n_train, generator=cpu_generator).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n_train, config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(module(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.detach().to(torch.float64) * batch.shape[0]
        train_loss = float(total.item()) / n_train
        val_loss: float | None = None
        val_accuracy: float | None = None
        if has_validation:
            assert data.x_val is not None and data.y_val is not None
            val_loss, val_accuracy = _cross_entropy(module, data.x_val, data.y_val)
            patience_out = tracker.update(val_loss, module, keep_weights=True)
        else:
            # The epoch's mean training loss was measured on moving weights with dropout active,
            # so it is a stopping signal only; the last weights are kept, not the "best" ones.
            patience_out = tracker.update(train_loss, module, keep_weights=False)
        if progress is not None:
            progress(TrainProgress(epoch, config.max_epochs, train_loss, val_loss, val_accuracy))
        if not math.isfinite(train_loss):
            break
        if patience_out:
            stopped_early = epoch < config.max_epochs
            break
    tracker.restore(module)
    return module, epoch, stopped_early


def _evaluate(
    module: nn.Module,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    y_train: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
) -> tuple[float, float, float, tuple[ClassMetrics, ...]]:
    device = next(module.parameters()).device
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(x_eval).to(device))
        predictions = logits.argmax(dim=1).cpu().numpy()
    acc = accuracy(y_eval, predictions)
    macro = macro_f1(y_eval, predictions)
    train_counts = np.bincount(y_train, minlength=num_classes)
    val_counts = np.bincount(y_val, minlength=num_classes)
    # argmax breaks ties towards the lowest label index, which keeps the baseline deterministic.
    majority = int(np.argmax(train_counts))
    baseline = float(np.mean(y_eval == majority))
    scored = np.union1d(y_eval, predictions)
    f1s = dict(zip(scored.tolist(), f1_per_label(y_eval, predictions, scored).tolist(), strict=True))
    per_class = tuple(
        ClassMetrics(
            label_index=label,
            train_count=int(train_counts[label]),
            validation_count=int(val_counts[label]),
            f1=f1s.get(label),
        )
        for label in range(num_classes)
    )
    return acc, macro, baseline, per_class


def train_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig = _DEFAULT_CONFIG,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    label_names: Sequence[str] | None = None,
) -> TrainedHead:
    """Train a head on ``embeddings`` (float, (n, dim)) labelled ``labels`` (int, (n,), in [0, num_classes)).

    ``progress`` is called once per epoch and ``should_stop`` polled before each epoch, both from the
    calling thread; a True from ``should_stop`` raises :class:`TrainingCancelled`. ``label_names``
    (optional, indexed by label) only makes error messages friendlier.

    Raises :class:`TrainingInputError` for unusable examples: shapes that disagree, non-finite
    values, fewer than 2 classes, or a class with fewer than ``min_examples_per_class`` examples.
    """
    started = time.perf_counter()
    x, y = _validate_inputs(embeddings, labels, num_classes, config, label_names)
    device = _resolve_device(config.device)
    train_idx, val_idx = stratified_split(y, num_classes, config.validation_fraction, config.seed)
    spec = HeadSpec(
        kind=config.kind,
        input_dim=int(x.shape[1]),
        num_classes=num_classes,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
    )
    has_validation = val_idx.size > 0
    data = _Data(
        x_train=torch.from_numpy(x[train_idx]).to(device),
        y_train=torch.from_numpy(y[train_idx]).to(device),
        x_val=torch.from_numpy(x[val_idx]).to(device) if has_validation else None,
        y_val=torch.from_numpy(y[val_idx]).to(device) if has_validation else None,
    )
    trainer = _train_linear if config.kind == "linear" else _train_mlp
    module, epochs, stopped_early = trainer(spec, data, config, progress, should_stop)
    # The head is deliberately not refit on train+validation afterwards: the reported metrics then
    # describe exactly the weights that get served, and training stays a single pass.
    module = module.to(dtype=torch.float32)
    state = {
        name: np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32).copy()
        for name, tensor in module.state_dict().items()
    }
    if not all(np.all(np.isfinite(array)) for array in state.values()):
        raise TrainingDivergedError(
            "training diverged (non-finite weights); try a smaller learning_rate or a larger l2"
        )
    eval_idx = val_idx if has_validation else train_idx
    acc, macro, baseline, per_class = _evaluate(
        module, x[eval_idx], y[eval_idx], y[train_idx], y[val_idx], num_classes
    )
    metrics = HeadMetrics(
        evaluated_on="validation" if has_validation else "train",
        accuracy=acc,
        macro_f1=macro,
        majority_baseline_accuracy=baseline,
        negative_transfer=acc <= baseline,
        per_class=per_class,
        epochs=epochs,
        train_seconds=time.perf_counter() - started,
        train_examples=int(train_idx.size),
        validation_examples=int(val_idx.size),
        stopped_early=stopped_early,
    )
    return TrainedHead(spec=spec, state=state, metrics=metrics, config=config)
