"""Head serialization: weights as safetensors bytes, everything else as a JSON manifest.

Nothing here uses pickle (or ``torch.save``/``torch.load``): a head's files may come from storage
shared between tenants, and loading them must never execute code. Loading validates every tensor
against the spec before anything is built from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from .ood import OOD_SCORE, REFERENCES_TENSOR
from .results import EVALUATED_ON, ClassMetrics, HeadMetrics, Selection, TrainedHead
from .spec import HeadSpec, expected_state_shapes

HEAD_FORMAT = "headswap.head/1"
_RESERVED_KEYS = frozenset({"format", "spec", "config", "metrics", "selection", "ood"})


class HeadFormatError(ValueError):
    """Stored head weights or manifest are malformed, inconsistent or of an unknown format."""


@dataclass(frozen=True)
class LoadedHead:
    spec: HeadSpec
    state: dict[str, np.ndarray]  # float32, validated against spec
    manifest: dict[str, Any]  # a deep, JSON-only copy of the manifest it was loaded with
    # Unit-norm training embeddings for out-of-distribution scores (float32 (m, input_dim)); None for a
    # version stored without them (trained before they were kept).
    references: np.ndarray | None = None


def _metrics_to_json(metrics: HeadMetrics) -> dict[str, Any]:
    as_dict = asdict(metrics)
    # asdict keeps tuples; lists are what JSON will give back, so use them from the start.
    as_dict["per_class"] = [asdict(item) for item in metrics.per_class]
    for name in ("log_loss_interval", "expected_calibration_error_interval"):
        if as_dict[name] is not None:
            as_dict[name] = list(as_dict[name])
    return as_dict


def head_to_bytes(
    head: TrainedHead,
    extra_manifest: Mapping[str, Any] | None = None,
    weights_metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``head`` to (safetensors bytes, JSON-serialisable manifest).

    ``extra_manifest`` entries (tenant, label names, timestamps...) are merged into the manifest's
    top level; they must be JSON-serialisable and may not shadow the reserved keys. ``weights_metadata``
    goes into the safetensors header instead: for bulky records that only matter when the weights are
    read anyway, and would otherwise be parsed with every manifest.
    """
    metadata = {**(weights_metadata or {}), "format": HEAD_FORMAT}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("weights_metadata must map strings to strings")
    extra = dict(extra_manifest or {})
    clashes = _RESERVED_KEYS.intersection(extra)
    if clashes:
        raise ValueError(f"extra_manifest may not set reserved key(s): {', '.join(sorted(clashes))}")
    expected = expected_state_shapes(head.spec)
    if set(head.state) != set(expected):
        raise ValueError(f"head state has tensors {sorted(head.state)}, its spec expects {sorted(expected)}")
    tensors = {name: np.ascontiguousarray(head.state[name], dtype=np.float32) for name in sorted(expected)}
    ood: dict[str, Any] = {}
    if head.ood_references is not None:
        refs = np.ascontiguousarray(head.ood_references, dtype=np.float32)
        if refs.ndim != 2 or refs.shape[1] != head.spec.input_dim:
            raise ValueError(f"ood references have shape {refs.shape}, expected (m, {head.spec.input_dim})")
        tensors[REFERENCES_TENSOR] = refs
        ood = {"ood": {"score": OOD_SCORE, "references": int(refs.shape[0])}}
    weights = safetensors.numpy.save(tensors, metadata=metadata)
    manifest: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "spec": asdict(head.spec),
        "config": asdict(head.config),
        "metrics": _metrics_to_json(head.metrics),
        "selection": asdict(head.selection),
        **ood,
        **extra,
    }
    try:
        # Strict JSON (no NaN/Infinity) so any JSON reader, not just Python's, can read it back.
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest is not JSON-serialisable: {exc}") from exc
    return weights, manifest


def _spec_from_manifest(manifest: Mapping[str, Any]) -> HeadSpec:
    raw = manifest.get("spec")
    if not isinstance(raw, Mapping):
        raise HeadFormatError("manifest has no 'spec' object")
    fields = ("kind", "input_dim", "num_classes", "hidden_dim", "dropout")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise HeadFormatError(f"manifest spec is missing {', '.join(missing)}")
    try:
        return HeadSpec(**{name: raw[name] for name in fields})
    except (TypeError, ValueError) as exc:
        raise HeadFormatError(f"manifest spec is invalid: {exc}") from exc


def head_from_bytes(weights: bytes, manifest: Mapping[str, Any]) -> LoadedHead:
    """Load and validate a head written by :func:`head_to_bytes`; raises :class:`HeadFormatError`."""
    if not isinstance(manifest, Mapping):
        raise HeadFormatError(f"manifest must be a mapping, got {type(manifest).__name__}")
    if manifest.get("format") != HEAD_FORMAT:
        raise HeadFormatError(f"unknown head format {manifest.get('format')!r}; expected {HEAD_FORMAT!r}")
    try:
        manifest_copy: dict[str, Any] = json.loads(json.dumps(dict(manifest), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise HeadFormatError(f"manifest is not plain JSON: {exc}") from exc
    spec = _spec_from_manifest(manifest_copy)
    if not isinstance(weights, bytes | bytearray | memoryview):
        raise HeadFormatError(f"weights must be bytes, got {type(weights).__name__}")
    try:
        loaded = safetensors.numpy.load(bytes(weights))
    except Exception as exc:  # the Rust parser raises its own error type for every kind of damage
        raise HeadFormatError(f"weights are not a valid safetensors file: {exc}") from exc
    expected = expected_state_shapes(spec)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise HeadFormatError(f"weights lack tensor(s) {', '.join(missing)} required by a {spec.kind} head")
    references = _references(loaded, spec, manifest_copy)
    unexpected = sorted(set(loaded) - set(expected) - {REFERENCES_TENSOR})
    if unexpected:
        raise HeadFormatError(f"weights hold unexpected tensor(s) {', '.join(unexpected)}")
    state: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        array = loaded[name]
        if array.dtype != np.float32:
            raise HeadFormatError(f"tensor {name} is {array.dtype}, expected float32")
        if tuple(array.shape) != shape:
            raise HeadFormatError(f"tensor {name} has shape {tuple(array.shape)}, the spec implies {shape}")
        if not np.all(np.isfinite(array)):
            raise HeadFormatError(f"tensor {name} contains NaN or infinite values")
        state[name] = np.ascontiguousarray(array)
    return LoadedHead(spec=spec, state=state, manifest=manifest_copy, references=references)


def _references(
    loaded: Mapping[str, np.ndarray], spec: HeadSpec, manifest: Mapping[str, Any]
) -> np.ndarray | None:
    """The stored training embeddings, validated; None when the version has none."""
    ood = manifest.get("ood")
    if REFERENCES_TENSOR not in loaded:
        if ood is not None:
            raise HeadFormatError(
                f"manifest records out-of-distribution references, the weights lack {REFERENCES_TENSOR}"
            )
        return None
    if not isinstance(ood, Mapping) or ood.get("score") != OOD_SCORE:
        raise HeadFormatError(
            f"weights hold {REFERENCES_TENSOR} but the manifest's 'ood' does not describe them"
        )
    array = loaded[REFERENCES_TENSOR]
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != spec.input_dim:
        raise HeadFormatError(
            f"tensor {REFERENCES_TENSOR} is {array.dtype} {tuple(array.shape)}, expected float32 (m, {spec.input_dim})"
        )
    if ood.get("references") != array.shape[0]:
        raise HeadFormatError(
            f"manifest says {ood.get('references')!r} references, the weights hold {array.shape[0]}"
        )
    if not np.all(np.isfinite(array)):
        raise HeadFormatError(f"tensor {REFERENCES_TENSOR} contains NaN or infinite values")
    return np.ascontiguousarray(array)


def read_weights_metadata(weights: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file's header; raises :class:`HeadFormatError`."""
    # The format: an 8-byte little-endian header length, then that many bytes of JSON.
    if len(weights) < 8:
        raise HeadFormatError("weights are too short to be a safetensors file")
    length = int.from_bytes(bytes(weights[:8]), "little")
    if length > len(weights) - 8:
        raise HeadFormatError("weights header runs past the end of the file")
    try:
        header = json.loads(bytes(weights[8 : 8 + length]))
    except ValueError as exc:
        raise HeadFormatError(f"weights header is not JSON: {exc}") from exc
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeadFormatError("weights header metadata is not a string mapping")
    return dict(metadata)


def _field(raw: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in raw:
        raise HeadFormatError(f"{where} is missing {name!r}")
    value = raw[name]
    # bool is an int subclass, but true/false is never a valid count or score.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise HeadFormatError(f"{where}.{name} has the wrong type: {value!r}")
    if not isinstance(value, kind):
        raise HeadFormatError(f"{where}.{name} has the wrong type: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise HeadFormatError(f"{where}.{name} is not finite")
    return value


def metrics_from_manifest(manifest: Mapping[str, Any]) -> HeadMetrics:
    """Rebuild the :class:`HeadMetrics` stored by :func:`head_to_bytes`; raises :class:`HeadFormatError`."""
    raw = manifest.get("metrics") if isinstance(manifest, Mapping) else None
    if not isinstance(raw, Mapping):
        raise HeadFormatError("manifest has no 'metrics' object")
    number = (int, float)
    raw_classes = _field(raw, "per_class", (list, tuple), "metrics")
    per_class: list[ClassMetrics] = []
    for i, item in enumerate(raw_classes):
        where = f"metrics.per_class[{i}]"
        if not isinstance(item, Mapping):
            raise HeadFormatError(f"{where} is not an object")
        f1 = item.get("f1")
        if f1 is not None:
            f1 = float(_field(item, "f1", number, where))
        per_class.append(
            ClassMetrics(
                label_index=_field(item, "label_index", int, where),
                train_count=_field(item, "train_count", int, where),
                validation_count=_field(item, "validation_count", int, where),
                f1=f1,
            )
        )
    evaluated_on = _field(raw, "evaluated_on", str, "metrics")
    if evaluated_on not in EVALUATED_ON:
        raise HeadFormatError(f"metrics.evaluated_on must be one of {EVALUATED_ON}, got {evaluated_on!r}")
    return HeadMetrics(
        evaluated_on=evaluated_on,
        accuracy=float(_field(raw, "accuracy", number, "metrics")),
        macro_f1=float(_field(raw, "macro_f1", number, "metrics")),
        majority_baseline_accuracy=float(_field(raw, "majority_baseline_accuracy", number, "metrics")),
        negative_transfer=_field(raw, "negative_transfer", bool, "metrics"),
        per_class=tuple(per_class),
        epochs=_field(raw, "epochs", int, "metrics"),
        train_seconds=float(_field(raw, "train_seconds", number, "metrics")),
        train_examples=_field(raw, "train_examples", int, "metrics"),
        validation_examples=_field(raw, "validation_examples", int, "metrics"),
        stopped_early=_field(raw, "stopped_early", bool, "metrics"),
        # Absent from versions trained before cross-validation and calibration: reported as unknown.
        folds=_field(raw, "folds", int, "metrics") if "folds" in raw else 0,
        log_loss=_optional_number(raw, "log_loss"),
        expected_calibration_error=_optional_number(raw, "expected_calibration_error"),
        log_loss_interval=_optional_interval(raw, "log_loss_interval"),
        expected_calibration_error_interval=_optional_interval(raw, "expected_calibration_error_interval"),
        ood_threshold=_optional_number(raw, "ood_threshold"),
        ood_flagged_share=_optional_number(raw, "ood_flagged_share"),
        confidence_cap=_optional_number(raw, "confidence_cap"),
    )


def _optional_number(raw: Mapping[str, Any], name: str, where: str = "metrics") -> float | None:
    if raw.get(name) is None:
        return None
    return float(_field(raw, name, (int, float), where))


def _optional_interval(raw: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    value = raw.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise HeadFormatError(f"metrics.{name} must be two finite numbers, got {value!r}")
    return float(value[0]), float(value[1])


def selection_from_manifest(manifest: Mapping[str, Any]) -> Selection:
    """The settings a version was fit with; raises :class:`HeadFormatError`.

    Versions written before settings were selected have no 'selection': they were fit with their
    config's l2 and served uncalibrated (temperature 1).
    """
    raw = manifest.get("selection") if isinstance(manifest, Mapping) else None
    if raw is None:
        config = manifest.get("config") if isinstance(manifest, Mapping) else None
        l2 = config.get("l2") if isinstance(config, Mapping) else None
        if isinstance(l2, bool) or not isinstance(l2, int | float):
            raise HeadFormatError("manifest has neither 'selection' nor a numeric config.l2")
        return Selection(float(l2), "caller", 1.0)
    if not isinstance(raw, Mapping):
        raise HeadFormatError("manifest 'selection' is not an object")
    number = (int, float)
    grid = _field(raw, "grid", (list, tuple), "selection") if "grid" in raw else ()
    losses = _field(raw, "grid_log_loss", (list, tuple), "selection") if "grid_log_loss" in raw else ()
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in (*grid, *losses)):
        raise HeadFormatError("selection.grid and selection.grid_log_loss must hold numbers")
    temperature = float(_field(raw, "temperature", number, "selection"))
    if temperature <= 0:
        raise HeadFormatError(f"selection.temperature must be positive, got {temperature}")
    return Selection(
        l2=float(_field(raw, "l2", number, "selection")),
        l2_source=_field(raw, "l2_source", str, "selection"),
        temperature=temperature,
        grid=tuple(float(v) for v in grid),
        grid_log_loss=tuple(float(v) for v in losses),
        fitted_temperature=_optional_number(raw, "fitted_temperature", "selection"),
    )
