"""What a head is, without building it: its kind and sizes (`HeadSpec`) and the tensors its weights must
hold. No torch here, so that the serving core can read manifests and check weights without loading it."""

from __future__ import annotations

from dataclasses import dataclass

HEAD_KINDS: tuple[str, ...] = ("linear", "mlp")


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
    if spec.kind == "linear":
        return {"weight": (spec.num_classes, spec.input_dim), "bias": (spec.num_classes,)}
    return {
        "hidden.weight": (spec.hidden_dim, spec.input_dim),
        "hidden.bias": (spec.hidden_dim,),
        "output.weight": (spec.num_classes, spec.hidden_dim),
        "output.bias": (spec.num_classes,),
    }
