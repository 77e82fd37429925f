"""What a head is, without building it: the registry of head kinds, a head's kind and sizes (`HeadSpec`) and
the tensors its weights must hold. No torch here, so that the serving core can read manifests and check
weights without loading it.

A head kind is one `HeadKind` in `_REGISTRY` plus its own module (`implementation`) with the torch side:
`build(spec, generator)` (its module), `fit_steps(config, folds)` and `fit_head(x, y, spec, plan, config, steps)`
(its training), and, for a kind that is not a plain linear map, `stacked_logits(rows, heads, device)` (its
grouped application, `grouped.py`). Serialisation, calibration, the head stack and the training loop look
the kind up here; the wire names it by its `HEAD_KIND_<NAME>` enum value (proto).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class HeadKind:
    name: str
    # The exact tensor names and shapes of the kind's module's state_dict, in a fixed order (the order a
    # stacked kind's `stacked_logits` receives them in).
    state_shapes: Callable[[HeadSpec], dict[str, tuple[int, ...]]]
    output: tuple[str, str]  # the output layer's weight and bias: calibration folds 1/T into them
    implementation: str  # the adapters module with the kind's torch side (see above)
    # A linear map (weight (classes, dim), bias (classes,)): the head stack keeps it in its slabs by
    # class-count bucket; any other kind is stacked per batch and applied by `stacked_logits`.
    linear_map: bool = False

    def module(self) -> ModuleType:
        return importlib.import_module(self.implementation)


def _linear_shapes(spec: HeadSpec) -> dict[str, tuple[int, ...]]:
    return {"weight": (spec.num_classes, spec.input_dim), "bias": (spec.num_classes,)}


def _mlp_shapes(spec: HeadSpec) -> dict[str, tuple[int, ...]]:
    return {
        "hidden.weight": (spec.hidden_dim, spec.input_dim),
        "hidden.bias": (spec.hidden_dim,),
        "output.weight": (spec.num_classes, spec.hidden_dim),
        "output.bias": (spec.num_classes,),
    }


_REGISTRY: dict[str, HeadKind] = {
    kind.name: kind
    for kind in (
        HeadKind("linear", _linear_shapes, ("weight", "bias"), "headswap.adapters.linear", linear_map=True),
        HeadKind("mlp", _mlp_shapes, ("output.weight", "output.bias"), "headswap.adapters.mlp"),
    )
}
HEAD_KINDS: tuple[str, ...] = tuple(_REGISTRY)


def head_kind(name: str) -> HeadKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown head kind {name!r}; expected one of {', '.join(HEAD_KINDS)}") from None


def _is_int(value: object) -> bool:
    # bool is an int subclass; `HeadSpec(input_dim=True, ...)` is a bug, not a 1-dim head.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class HeadSpec:
    """Everything needed to rebuild a head's module before loading its weights."""

    kind: str
    input_dim: int
    num_classes: int
    # Only used by the "mlp" kind; kept on every spec so that a spec round-trips unchanged.
    hidden_dim: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        if not _is_int(self.input_dim) or self.input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {self.input_dim!r}")
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(f"a head needs at least 2 classes, got num_classes={self.num_classes!r}")
        if not _is_int(self.hidden_dim) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive integer, got {self.hidden_dim!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def expected_state_shapes(spec: HeadSpec) -> dict[str, tuple[int, ...]]:
    """The exact tensor names and shapes of ``build_head(spec).state_dict()``.

    Written out rather than derived from a module so that loading untrusted weights can be
    validated before any module is allocated.
    """
    return head_kind(spec.kind).state_shapes(spec)
