"""What a training may be asked: the caller's options as a TrainConfig, and the examples checked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from headswap.adapters import TrainConfig, min_examples_per_class
from headswap.server.config import LimitsConfig
from headswap.server.domain import Example, TrainingOptions
from headswap.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from headswap.server.validation import check_kind

MAX_LABEL_CHARS = 200
# Caps that keep one training's size sane whatever the time budget (it is enforced while training too).
MAX_EPOCHS = 1000
MAX_HIDDEN_DIM = 2048


def train_config(options: TrainingOptions, device: str) -> TrainConfig:
    """Zero values mean the defaults; anything out of range is INVALID_ARGUMENT with the reason.

    The defaults leave `validation_fraction` and `l2` unset: cross-validated (or, for large sets, held-out)
    model selection and calibration, then a refit on every example.
    """
    defaults = TrainConfig()
    # Bounds that keep one training from taking the server's memory or hours of its time.
    if not 0 <= options.max_epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"max_epochs must be between 1 and {MAX_EPOCHS}, not {options.max_epochs}")
    if not 0 <= options.hidden_dim <= MAX_HIDDEN_DIM:
        raise InvalidArgument(f"hidden_dim must be between 1 and {MAX_HIDDEN_DIM}, not {options.hidden_dim}")
    if options.no_validation and options.validation_fraction:
        raise InvalidArgument("set validation_fraction or no_validation, not both")
    fraction = 0.0 if options.no_validation else (options.validation_fraction or None)
    try:
        return TrainConfig(
            kind=options.kind,
            validation_fraction=fraction,
            seed=int(options.seed),
            l2=options.l2 or None,
            max_epochs=options.max_epochs or defaults.max_epochs,
            hidden_dim=options.hidden_dim or defaults.hidden_dim,
            dropout=options.dropout or defaults.dropout,
            device=device,
        )
    except ValueError as exc:
        raise InvalidArgument(f"bad training options: {exc}") from None


def check_new_examples(
    tenant: str, new: Sequence[Example], stored: Sequence[Example], limits: LimitsConfig, input_kind: str
) -> None:
    """The examples of a call (indexed as sent) and what they add up to with the stored ones."""
    for i, e in enumerate(new):
        check_kind(e.input, input_kind, f"examples[{i}]", "the backbone they go to")
        if isinstance(e.input.content, str) and not e.input.content.strip():
            raise InvalidArgument(f"examples[{i}] has empty text")
        if not e.label.strip():
            raise InvalidArgument(f"examples[{i}] has an empty label")
        if len(e.label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"examples[{i}] has a label longer than {MAX_LABEL_CHARS} characters")
    if stored and stored[0].input.kind != input_kind:
        raise FailedPrecondition(
            f"tenant {tenant!r} has {stored[0].input.kind} examples stored and these are {input_kind}s: "
            "send them with mode EXAMPLE_MODE_REPLACE to start over on the other backbone"
        )
    count = len(stored) + len(new)
    if count > limits.max_examples:
        raise InvalidArgument(
            f"{count} examples in all, more than this server's limit of {limits.max_examples} "
            "per tenant: send fewer, or replace instead of adding"
        )
    size = sum(e.input.nbytes + len(e.label) for e in [*stored, *new])
    if size > limits.max_example_bytes:
        raise ResourceExhausted(
            f"the tenant's examples would take {size} bytes, more than this server's limit of "
            f"{limits.max_example_bytes} per tenant: send fewer or smaller examples, or replace instead of adding"
        )


def check_examples(
    examples: list[Example], config: TrainConfig, limits: LimitsConfig
) -> tuple[list[str], np.ndarray]:
    """Label names (sorted) and label indices, or INVALID_ARGUMENT saying what is wrong with the examples."""
    if not examples:
        raise InvalidArgument("no examples: send labelled examples (the tenant has none stored)")
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise InvalidArgument(
            f"only one class ({labels[0]!r}): a classifier needs examples of at least two labels"
        )
    if len(labels) > limits.max_classes:
        raise InvalidArgument(
            f"{len(labels)} labels, more than this server's limit of {limits.max_classes} per head"
        )
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[e.label] for e in examples], dtype=np.int64)
    need = min_examples_per_class(config.validation_fraction)
    counts = np.bincount(y, minlength=len(labels))
    short = [labels[i] for i in np.flatnonzero(counts < need)]
    if short:
        shown = ", ".join(repr(s) for s in short[:5]) + (" ..." if len(short) > 5 else "")
        raise InvalidArgument(
            f"{len(short)} label(s) have fewer than {need} examples, which validation needs (one to train "
            f"on, one to hold out for choosing settings and checking the head): {shown}; add examples, "
            "or train without validation (no_validation)"
        )
    return labels, y
