"""headswap.adapters: tenant head architectures, their training and serialization.

Names are imported on first use (PEP 562), so that importing a torch-free part (the gate, the results, the
head spec, serialization) does not load PyTorch: the serving core reads manifests and checks weights
without it. Training and applying heads (`train_head`, `build_head`, `HeadModule`, ...) load torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibration import expected_calibration_error, fit_temperature, fold_temperature
    from .config import (
        TrainConfig,
        TrainingCancelled,
        TrainingDivergedError,
        TrainingInputError,
        min_examples_per_class,
    )
    from .gate import (
        ACTIVE_VERSION,
        ALPHA,
        MAJORITY_BASELINE,
        MIN_SKILL,
        GateCheck,
        active_version_check,
        binomial_cdf,
    )
    from .heads import GeneratorDropout, MLPHead, build_head
    from .inference import HeadModule, top_k
    from .linear import LBFGS_ITERATIONS_PER_EPOCH
    from .metrics import accuracy, f1_per_label, macro_f1
    from .results import ClassMetrics, HeadMetrics, HeldOut, Selection, TrainedHead, TrainProgress
    from .selection import DEFAULT_L2, L2_GRID, MAX_FOLDS, stratified_folds, stratified_split
    from .serialization import (
        HEAD_FORMAT,
        HeadFormatError,
        LoadedHead,
        head_from_bytes,
        head_to_bytes,
        metrics_from_manifest,
        read_weights_metadata,
        selection_from_manifest,
    )
    from .spec import HEAD_KINDS, HeadSpec, expected_state_shapes
    from .training import train_head

_WHERE: dict[str, str] = {
    "ACTIVE_VERSION": "gate",
    "ALPHA": "gate",
    "ClassMetrics": "results",
    "DEFAULT_L2": "selection",
    "GateCheck": "gate",
    "GeneratorDropout": "heads",
    "HEAD_FORMAT": "serialization",
    "HEAD_KINDS": "spec",
    "HeadFormatError": "serialization",
    "HeadMetrics": "results",
    "HeadModule": "inference",
    "HeadSpec": "spec",
    "HeldOut": "results",
    "L2_GRID": "selection",
    "LBFGS_ITERATIONS_PER_EPOCH": "linear",
    "LoadedHead": "serialization",
    "MAJORITY_BASELINE": "gate",
    "MAX_FOLDS": "selection",
    "MIN_SKILL": "gate",
    "MLPHead": "heads",
    "Selection": "results",
    "TrainConfig": "config",
    "TrainProgress": "results",
    "TrainedHead": "results",
    "TrainingCancelled": "config",
    "TrainingDivergedError": "config",
    "TrainingInputError": "config",
    "accuracy": "metrics",
    "active_version_check": "gate",
    "binomial_cdf": "gate",
    "build_head": "heads",
    "expected_calibration_error": "calibration",
    "expected_state_shapes": "spec",
    "f1_per_label": "metrics",
    "fit_temperature": "calibration",
    "fold_temperature": "calibration",
    "head_from_bytes": "serialization",
    "head_to_bytes": "serialization",
    "macro_f1": "metrics",
    "metrics_from_manifest": "serialization",
    "min_examples_per_class": "config",
    "read_weights_metadata": "serialization",
    "selection_from_manifest": "serialization",
    "stratified_folds": "selection",
    "stratified_split": "selection",
    "top_k": "inference",
    "train_head": "training",
}

__all__ = [
    "ACTIVE_VERSION",
    "ALPHA",
    "DEFAULT_L2",
    "HEAD_FORMAT",
    "HEAD_KINDS",
    "L2_GRID",
    "LBFGS_ITERATIONS_PER_EPOCH",
    "MAJORITY_BASELINE",
    "MAX_FOLDS",
    "MIN_SKILL",
    "ClassMetrics",
    "GateCheck",
    "GeneratorDropout",
    "HeadFormatError",
    "HeadMetrics",
    "HeadModule",
    "HeadSpec",
    "HeldOut",
    "LoadedHead",
    "MLPHead",
    "Selection",
    "TrainConfig",
    "TrainProgress",
    "TrainedHead",
    "TrainingCancelled",
    "TrainingDivergedError",
    "TrainingInputError",
    "accuracy",
    "active_version_check",
    "binomial_cdf",
    "build_head",
    "expected_calibration_error",
    "expected_state_shapes",
    "f1_per_label",
    "fit_temperature",
    "fold_temperature",
    "head_from_bytes",
    "head_to_bytes",
    "macro_f1",
    "metrics_from_manifest",
    "min_examples_per_class",
    "read_weights_metadata",
    "selection_from_manifest",
    "stratified_folds",
    "stratified_split",
    "top_k",
    "train_head",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
