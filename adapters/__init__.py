"""headswap.adapters: tenant head architectures, their training and serialization (needs torch)."""

from .heads import HEAD_KINDS, GeneratorDropout, HeadSpec, MLPHead, build_head, expected_state_shapes
from .inference import HeadModule, top_k
from .metrics import accuracy, f1_per_label, macro_f1
from .serialization import (
    HEAD_FORMAT,
    HeadFormatError,
    LoadedHead,
    head_from_bytes,
    head_to_bytes,
    metrics_from_manifest,
)
from .training import (
    LBFGS_ITERATIONS_PER_EPOCH,
    ClassMetrics,
    HeadMetrics,
    TrainConfig,
    TrainedHead,
    TrainingCancelled,
    TrainingDivergedError,
    TrainingInputError,
    TrainProgress,
    min_examples_per_class,
    stratified_split,
    train_head,
)

__all__ = [
    "HEAD_FORMAT",
    "HEAD_KINDS",
    "LBFGS_ITERATIONS_PER_EPOCH",
    "ClassMetrics",
    "GeneratorDropout",
    "HeadFormatError",
    "HeadMetrics",
    "HeadModule",
    "HeadSpec",
    "LoadedHead",
    "MLPHead",
    "TrainConfig",
    "TrainProgress",
    "TrainedHead",
    "TrainingCancelled",
    "TrainingDivergedError",
    "TrainingInputError",
    "accuracy",
    "build_head",
    "expected_state_shapes",
    "f1_per_label",
    "head_from_bytes",
    "head_to_bytes",
    "macro_f1",
    "metrics_from_manifest",
    "min_examples_per_class",
    "stratified_split",
    "top_k",
    "train_head",
]
