"""Tenant head architectures: small classifiers that map a frozen embedding to class logits."""

from __future__ import annotations

import math

import torch
from torch import nn

from .spec import HeadSpec, head_kind


class GeneratorDropout(nn.Module):
    """Inverted dropout that can draw its masks from a private ``torch.Generator``.

    ``nn.Dropout`` only uses the process-wide RNG, so two tenants training at the same time in
    server threads would perturb each other's masks and a fixed seed would stop reproducing a head.
    Without a generator it behaves like ``nn.Dropout`` (global RNG); in eval mode it is the identity.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        noise = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x * (noise >= self.p).to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLPHead(nn.Module):
    """Linear -> GELU -> dropout -> linear; named submodules give readable tensor names on disk."""

    def __init__(self, input_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.activation = nn.GELU()
        self.dropout = GeneratorDropout(dropout)
        self.output = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.activation(self.hidden(x))))


def init_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """Same distribution as nn.Linear.reset_parameters, but from a private generator."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_head(spec: HeadSpec, generator: torch.Generator | None = None) -> nn.Module:
    """Build the (float32, CPU) module for ``spec`` (its kind's `build`: linear.py, mlp.py); it outputs
    logits, not probabilities.

    With ``generator`` the initial weights come from it instead of the global RNG, which makes
    initialisation reproducible without touching process-wide state.
    """
    with torch.no_grad():
        module: nn.Module = head_kind(spec.kind).module().build(spec, generator)
    return module
