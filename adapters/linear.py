"""The linear head: multinomial logistic regression with exactly scikit-learn's objective.

``fit`` minimises sum_i CE_i + (l2 / 2) * ||W||^2 (bias unpenalised; l2 is scikit-learn's 1/C),
divided by n so that L-BFGS's absolute tolerances mean the same for any number of examples, full
batch with L-BFGS and scikit-learn's stopping test (largest gradient entry <= 1e-4). ``path`` fits a
sequence of l2 values on every fold, strong to weak, each fit starting from the previous solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .calibration import fit_temperature, per_example_log_loss
from .config import TrainConfig
from .heads import init_linear_
from .results import Selection
from .selection import DEFAULT_L2, L2_GRID, Plan, choose_l2, path_exhausted
from .spec import HeadSpec

if TYPE_CHECKING:
    from .training import Steps

# L-BFGS iterations that make up one "epoch" of the linear recipe (the unit of max_epochs).
LBFGS_ITERATIONS_PER_EPOCH = 10
LBFGS_GRADIENT_TOLERANCE = 1e-4
# scikit-learn's lbfgs solver goes through scipy with maxcor=10; the same history keeps the two
# optimisers' trajectories close.
_LBFGS_HISTORY = 10


@dataclass(frozen=True)
class LinearFit:
    weight: torch.Tensor  # (classes, dim) float32
    bias: torch.Tensor  # (classes,)
    iterations: int
    train_loss: float  # mean cross-entropy on the fitted examples, without the penalty


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    start: tuple[torch.Tensor, torch.Tensor] | None,
    max_iterations: int,
    check_cancel: Callable[[], None],
) -> LinearFit:
    """One L-BFGS fit from ``start`` (zeros, like scikit-learn, when None)."""
    n, dim = x.shape
    if start is None:
        weight = torch.zeros((num_classes, dim), dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        weight, bias = start[0].clone(), start[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
    # With two classes scikit-learn fits one weight vector w = W1 - W0 with (1/(2C)) ||w||^2. The softmax
    # depends on W only through w, and the (l2/2)(||W0||^2 + ||W1||^2) at its optimum W1 = -W0 = w/2 is
    # (l2/4) ||w||^2: doubling the penalty keeps l2 exactly 1/C for binary heads too.
    penalty = (2.0 if num_classes == 2 else 1.0) * l2 / n
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iterations,
        history_size=_LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
        tolerance_grad=LBFGS_GRADIENT_TOLERANCE,
        tolerance_change=1e-9,
    )

    # Gradients written by hand: (softmax - onehot)^T x is two matrix products per evaluation, a
    # third less work than autograd's graph for the same numbers.
    @torch.no_grad()
    def closure() -> torch.Tensor:
        check_cancel()
        logits = torch.addmm(bias, x, weight.T)
        lse = torch.logsumexp(logits, dim=1)
        data_loss = (lse - (logits * onehot).sum(dim=1)).mean()
        residual = (torch.exp(logits - lse[:, None]) - onehot) / n
        weight.grad = residual.T @ x + penalty * weight
        bias.grad = residual.sum(dim=0)
        return data_loss + 0.5 * penalty * (weight * weight).sum()

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    with torch.no_grad():
        train_loss = float(torch.nn.functional.cross_entropy(torch.addmm(bias, x, weight.T), y).item())
    return LinearFit(weight.detach(), bias.detach(), int(state.get("n_iter", 0)), train_loss)


@dataclass
class PathResult:
    """Held-out results of every grid value walked (a prefix of the grid asked for), one entry each."""

    grid: list[float] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # (n_held, classes), rows in plan.held_out order
    losses: list[np.ndarray] = field(default_factory=list)  # per example, after the value's own temperature
    temperatures: list[float] = field(default_factory=list)
    starts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # mean of fold solutions


def path(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    plan: Plan,
    grid: tuple[float, ...],
    max_iterations: int,
    report: Callable[[float, float, float], None],
    check_cancel: Callable[[], None],
) -> PathResult:
    """Walk ``grid`` (strong to weak) on every fold of ``plan``, warm-starting each fit from the same
    fold's previous one; ``report(train_loss, held_out_loss, held_out_accuracy)`` after each fit."""
    held_all = plan.held_out
    position = np.empty(x.shape[0], dtype=np.int64)
    position[held_all] = np.arange(held_all.size)
    y_held = y.cpu().numpy()[held_all]
    previous: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(plan.folds)
    result = PathResult()
    for l2 in grid:
        logits = np.empty((held_all.size, num_classes), dtype=np.float32)
        solutions: list[tuple[torch.Tensor, torch.Tensor]] = []
        for f, (fit_idx, held_idx) in enumerate(plan.folds):
            fit_rows, held_rows = (
                torch.as_tensor(fit_idx, device=x.device),
                torch.as_tensor(held_idx, device=x.device),
            )
            solution = fit(
                x[fit_rows], y[fit_rows], num_classes, l2, previous[f], max_iterations, check_cancel
            )
            solutions.append((solution.weight, solution.bias))
            previous[f] = solutions[-1]
            with torch.no_grad():
                held_logits = torch.addmm(solution.bias, x[held_rows], solution.weight.T)
                held_loss = float(torch.nn.functional.cross_entropy(held_logits, y[held_rows]).item())
                held_accuracy = float((held_logits.argmax(dim=1) == y[held_rows]).double().mean().item())
            logits[position[held_idx]] = held_logits.cpu().numpy()
            report(solution.train_loss, held_loss, held_accuracy)
        temperature = fit_temperature(logits, y_held)
        result.grid.append(l2)
        result.logits.append(logits)
        result.losses.append(per_example_log_loss(logits, y_held, temperature))
        result.temperatures.append(temperature)
        result.starts.append(
            (torch.stack([w for w, _ in solutions]).mean(0), torch.stack([b for _, b in solutions]).mean(0))
        )
        if path_exhausted(grid, [float(loss.mean()) for loss in result.losses]):
            break
    return result


# -- the linear head kind (spec.py): its module, its training --------------------------------------------


def build(spec: HeadSpec, generator: torch.Generator | None) -> nn.Module:
    """logits = x W^T + b."""
    layer = nn.Linear(spec.input_dim, spec.num_classes)
    if generator is not None:
        init_linear_(layer, generator)
    return layer


def fit_steps(config: TrainConfig, folds: int) -> int:
    """One step per l2 value per fold, and the refit."""
    return (len(L2_GRID) if config.l2 is None else 1) * folds + 1


def fit_head(
    x: torch.Tensor, y: torch.Tensor, spec: HeadSpec, plan: Plan, config: TrainConfig, steps: Steps
) -> tuple[dict[str, torch.Tensor], Selection, np.ndarray | None, int, bool]:
    """The linear kind's training: the L2 path on the folds (when there are any), then the refit on every
    example from the chosen solution; the weights, the selection, the held-out logits, the epochs and
    whether L-BFGS converged before max_epochs."""
    max_iterations = config.max_epochs * LBFGS_ITERATIONS_PER_EPOCH
    start: tuple[torch.Tensor, torch.Tensor] | None = None
    held_logits: np.ndarray | None = None
    if plan.folds:
        grid = L2_GRID if config.l2 is None else (config.l2,)
        walk = path(x, y, spec.num_classes, plan, grid, max_iterations, steps, steps.check)
        chosen = choose_l2(grid, walk.losses)
        selection = Selection(
            l2=walk.grid[chosen],
            l2_source=plan.method if config.l2 is None else "caller",
            temperature=walk.temperatures[chosen],
            grid=tuple(walk.grid),
            grid_log_loss=tuple(float(loss.mean()) for loss in walk.losses),
        )
        held_logits, start = walk.logits[chosen], walk.starts[chosen]
    else:
        l2 = DEFAULT_L2 if config.l2 is None else config.l2
        selection = Selection(l2, "default" if config.l2 is None else "caller", 1.0)
    steps.final(1)
    final = fit(x, y, spec.num_classes, selection.l2, start, max_iterations, steps.check)
    steps(final.train_loss, None, None)
    epochs = max(1, math.ceil(final.iterations / LBFGS_ITERATIONS_PER_EPOCH))
    state = {"weight": final.weight, "bias": final.bias}
    return state, selection, held_logits, epochs, final.iterations < max_iterations
