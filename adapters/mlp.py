"""The MLP head's training loop: AdamW on shuffled minibatches, one hidden layer with dropout.

Model selection for the MLP is the number of epochs: each fold trains with early stopping on its
held-out loss, and the head is then refit on every example for the median of the folds' best epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calibration import fit_temperature
from .config import TrainConfig
from .heads import MLPHead, build_head, init_linear_
from .results import Selection
from .selection import DEFAULT_L2, Plan
from .spec import HeadSpec

if TYPE_CHECKING:
    from .training import Steps


@dataclass(frozen=True)
class MLPFit:
    module: nn.Module
    best_epoch: int  # the epoch whose weights were kept (with a held-out set), else the last one run
    epochs: int  # epochs run
    stopped_early: bool


@dataclass(frozen=True)
class MLPSettings:
    l2: float
    learning_rate: float
    batch_size: int
    patience: int
    seed: int


class _BestWeights:
    """Tracks the lowest monitored loss, the weights that produced it and the epochs since."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_without_improvement = 0

    def update(self, epoch: int, loss: float, module: nn.Module, keep_weights: bool) -> bool:
        """Record one epoch; True when patience has run out."""
        # NaN compares False, so a diverging epoch counts as "no improvement" and is never kept.
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self.epochs_without_improvement = 0
            if keep_weights:
                self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience


def held_out_scores(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``module`` in eval mode, without gradients."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(x)
        loss = float(F.cross_entropy(logits, y).item())
        acc = float((logits.argmax(dim=1) == y).to(torch.float64).mean().item())
    module.train(was_training)
    return loss, acc


def train(
    spec: HeadSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    held_out: tuple[torch.Tensor, torch.Tensor] | None,
    settings: MLPSettings,
    epochs: int,
    stop_on_patience: bool,
    report: Callable[[float, float | None, float | None], None],
    check_cancel: Callable[[], None],
) -> MLPFit:
    """Train for at most ``epochs``; with ``held_out`` keep the weights of the lowest held-out loss.

    Without ``stop_on_patience`` it runs exactly ``epochs`` (a refit for a chosen number of epochs).
    """
    device = x.device
    # Independent streams for initialisation+shuffling and for dropout, all private to this call:
    # the global RNG is shared with every other thread of the server, so seeding it would neither
    # be reproducible under concurrency nor free of side effects for callers.
    init_seed, dropout_seed = np.random.SeedSequence(settings.seed).generate_state(2, dtype=np.uint32)
    cpu_generator = torch.Generator().manual_seed(int(init_seed))
    module = build_head(spec, generator=cpu_generator).to(device)
    assert isinstance(module, MLPHead)
    module.dropout.generator = torch.Generator(device=device).manual_seed(int(dropout_seed))
    n = x.shape[0]
    # AdamW's decoupled decay shrinks weights by lr * weight_decay per step. With
    # weight_decay = l2 / n that is the shrinkage plain gradient descent on the linear
    # head's objective (mean CE + l2 / (2 n) * ||W||^2) would apply, so l2 keeps one meaning
    # across kinds and weakens as examples accumulate. Biases are not decayed, as for the linear head.
    decayed = [p for p in module.parameters() if p.ndim > 1]
    not_decayed = [p for p in module.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": settings.l2 / n}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=settings.learning_rate,
    )
    tracker = _BestWeights(settings.patience)
    epoch, stopped_early = 0, False
    for epoch in range(1, epochs + 1):
        check_cancel()
        module.train()
        # The permutation is drawn on CPU so that it is identical whatever the device.
        order = torch.randperm(n, generator=cpu_generator).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = F.cross_entropy(module(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.detach().to(torch.float64) * batch.shape[0]
        train_loss = float(total.item()) / n
        held_loss: float | None = None
        held_accuracy: float | None = None
        if held_out is not None:
            held_loss, held_accuracy = held_out_scores(module, *held_out)
            patience_out = tracker.update(epoch, held_loss, module, keep_weights=True)
        else:
            # The epoch's mean training loss was measured on moving weights with dropout active,
            # so it is a stopping signal only; the last weights are kept, not the "best" ones.
            patience_out = tracker.update(epoch, train_loss, module, keep_weights=False)
        report(train_loss, held_loss, held_accuracy)
        if not math.isfinite(train_loss):
            break
        if stop_on_patience and patience_out:
            stopped_early = epoch < epochs
            break
    best_epoch = epoch
    if held_out is not None and tracker.best_state is not None:
        module.load_state_dict(tracker.best_state)
        best_epoch = tracker.best_epoch
    return MLPFit(module.eval(), best_epoch, epoch, stopped_early)


# -- the mlp head kind (spec.py): its module, its training, its grouped application ------------------------


def build(spec: HeadSpec, generator: torch.Generator | None) -> nn.Module:
    module = MLPHead(spec.input_dim, spec.hidden_dim, spec.num_classes, spec.dropout)
    if generator is not None:
        init_linear_(module.hidden, generator)
        init_linear_(module.output, generator)
    return module


def fit_steps(config: TrainConfig, folds: int) -> int:
    """Up to max_epochs per fold, and as many for the refit."""
    return (folds + 1) * config.max_epochs


def fit_head(
    x: torch.Tensor, y: torch.Tensor, spec: HeadSpec, plan: Plan, config: TrainConfig, steps: Steps
) -> tuple[dict[str, torch.Tensor], Selection, np.ndarray | None, int, bool]:
    """The mlp kind's training: early stopping on each fold picks the epochs, the folds' held-out logits
    the temperature; then the refit on every example for that many epochs."""
    l2 = DEFAULT_L2 if config.l2 is None else config.l2
    settings = MLPSettings(l2, config.learning_rate, config.batch_size, config.patience, config.seed)
    source = "default" if config.l2 is None else "caller"
    if not plan.folds:
        fitted = train(spec, x, y, None, settings, config.max_epochs, True, steps, steps.check)
        return _state(fitted.module), Selection(l2, source, 1.0), None, fitted.epochs, fitted.stopped_early
    held_all = plan.held_out
    position = np.empty(x.shape[0], dtype=np.int64)
    position[held_all] = np.arange(held_all.size)
    held_logits = np.empty((held_all.size, spec.num_classes), dtype=np.float32)
    best_epochs = []
    for fit_idx, held_idx in plan.folds:
        fit_rows, held_rows = (
            torch.as_tensor(fit_idx, device=x.device),
            torch.as_tensor(held_idx, device=x.device),
        )
        held = (x[held_rows], y[held_rows])
        fold = train(
            spec, x[fit_rows], y[fit_rows], held, settings, config.max_epochs, True, steps, steps.check
        )
        best_epochs.append(fold.best_epoch)
        with torch.no_grad():
            held_logits[position[held_idx]] = fold.module(held[0]).cpu().numpy()
    # The median of the folds' best epochs, rounded half up: the refit runs exactly that many.
    epochs = max(1, math.floor(float(np.median(best_epochs)) + 0.5))
    temperature = fit_temperature(held_logits, y.cpu().numpy()[held_all])
    steps.final(epochs)
    fitted = train(spec, x, y, None, settings, epochs, False, steps, steps.check)
    return _state(fitted.module), Selection(l2, source, temperature), held_logits, epochs, False


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def stacked_logits(
    grouped: torch.Tensor, heads: Sequence[tuple[torch.Tensor, ...]], device: torch.device
) -> torch.Tensor:
    """Logits of several MLP heads at once (grouped.py): `grouped` is (heads, rows, dim), each head's rows
    zero-padded; `heads` their tensors in `spec.py`'s order (hidden weight, bias, output weight, bias).
    Padded to the widest hidden layer and class count, and run as two batched matrix products."""
    hidden = max(h[0].shape[0] for h in heads)
    classes = max(h[2].shape[0] for h in heads)
    dim = grouped.shape[2]
    w1 = torch.zeros((len(heads), hidden, dim), device=device)
    b1 = torch.zeros((len(heads), hidden), device=device)
    w2 = torch.zeros((len(heads), classes, hidden), device=device)
    b2 = torch.full((len(heads), classes), float("-inf"), device=device)
    for i, (hw1, hb1, hw2, hb2) in enumerate(heads):
        # Padded hidden units have zero weights in and out, so GELU(0) = 0 adds nothing.
        w1[i, : hw1.shape[0]] = hw1
        b1[i, : hb1.shape[0]] = hb1
        w2[i, : hw2.shape[0], : hw2.shape[1]] = hw2
        b2[i, : hb2.shape[0]] = hb2
    hidden_out = torch.nn.functional.gelu(torch.baddbmm(b1.unsqueeze(1), grouped, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden_out, w2.transpose(1, 2))
