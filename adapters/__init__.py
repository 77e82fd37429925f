"""headswap.adapters: tenant head architectures, their training and serialization (needs torch)."""

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
from .heads import HEAD_KINDS, GeneratorDropout, HeadSpec, MLPHead, build_head, expected_state_shapes
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
from .training import train_head

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
