"""Manifests: of an exported backbone directory (what the model is and how to feed it), and of a stored head
version (head.json: its labels, what it was trained on, sealed with its weights)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "headswap.backbone/1"
MODEL_FP32 = "model.onnx"
MODEL_FP16 = "model_fp16.onnx"
MODEL_INT8 = "model_int8.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
TOKENIZER = "tokenizer.json"
# Each export's parity gate: the least cosine of any embedding to the source model's (PyTorch) on the
# parity set; int8 also needs a mean of at least MIN_MEAN_COSINE_INT8. An export that misses one writes
# nothing, so every precision a manifest lists passed; `parity_passed` re-reads the record.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
MIN_MEAN_COSINE_INT8 = 0.99


@dataclass(frozen=True)
class BackboneManifest:
    name: str
    embedding_dim: int
    # How token states become one vector. Both steps run inside the ONNX graph, so the model's output is
    # already the final embedding; the manifest records them so a reader knows what it gets.
    pooling: str  # "mean" (mask-aware)
    normalization: str  # "l2"
    max_length: int  # tokens, including [CLS] and [SEP]; longer text is truncated
    input_kind: str  # "text" or "image"
    fingerprint: str  # sha256 over the fp32 model, the tokenizer and the fields above (fp32 and fp16)
    model_fp32: str = MODEL_FP32
    model_fp16: str = MODEL_FP16
    # The int8 model is a different function (its embeddings drift by about 1% from fp32), so it has its own
    # fingerprint: a head trained on fp32 embeddings never silently runs on int8 ones. "" = not exported.
    model_int8: str = ""
    fingerprint_int8: str = ""
    tokenizer: str = TOKENIZER
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    output_name: str = "sentence_embedding"
    # Fused operator counts found by ONNX Runtime's transformer optimizer, and measured parity.
    fused_operators: tuple[tuple[str, int], ...] = ()
    parity_min_cosine_fp32: float = 0.0
    parity_min_cosine_fp16: float = 0.0
    # Image backbones: resize the shorter side to `resize`, centre-crop `image_size` square, scale to 0..1,
    # then (x - mean) / std per RGB channel; the model takes float32 NCHW `pixels`.
    image_size: int = 0
    resize: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # Against the PyTorch original on the int8 parity set (real sentences), and how the model was made.
    parity_min_cosine_int8: float = 0.0
    parity_mean_cosine_int8: float = 0.0
    # The CPU's int8 kernel family the int8 parity was measured with (`precision.int8_kernels`): the margin
    # over the gate is known per family ("" for exports that predate the record).
    parity_int8_cpu: str = ""
    quantization: tuple[tuple[str, str], ...] = ()
    format: str = MANIFEST_FORMAT

    def to_json(self) -> str:
        data = asdict(self)
        data["fused_operators"] = dict(self.fused_operators)
        data["quantization"] = dict(self.quantization)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneManifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"unknown backbone manifest format {data.get('format')!r}; want {MANIFEST_FORMAT}"
            )
        # Fields this version does not know are a newer exporter's additions: read past them, so that a
        # backbone exported by a newer headswap still serves on an older replica of the same format.
        known = {f.name for f in dataclass_fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        fields["input_names"] = tuple(fields.get("input_names", ()))
        fields["mean"] = tuple(fields.get("mean", ()))
        fields["std"] = tuple(fields.get("std", ()))
        fields["fused_operators"] = tuple(sorted((fields.get("fused_operators") or {}).items()))
        fields["quantization"] = tuple(sorted((fields.get("quantization") or {}).items()))
        return cls(**fields)

    def has(self, precision: str) -> bool:
        return bool(
            {"fp32": self.model_fp32, "fp16": self.model_fp16, "int8": self.model_int8}.get(precision)
        )

    def model_for(self, precision: str) -> str:
        """The model file that serves `precision`."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if not self.has(precision):
            raise ValueError(
                f"backbone {self.name} has no {precision} model: export it again "
                f"(`headswap export --force`, which writes fp32, fp16 and int8)"
            )
        return {"fp32": self.model_fp32, "fp16": self.model_fp16, "int8": self.model_int8}[precision]

    def fingerprint_for(self, precision: str) -> str:
        """The embeddings' identity: fp16 shares fp32's fingerprint (its parity gate is 0.999 cosine); int8
        has its own. `fingerprint` (fp32's) also names the weights: the backbone family heads are bound to."""
        self.model_for(precision)
        return self.fingerprint_int8 if precision == "int8" else self.fingerprint

    def embedding_key(self, precision: str) -> str:
        """What the embedding cache is keyed by: one key per precision, so that one training's vectors all
        come from one precision (fp32's and int8's keys are their fingerprints, as before; fp16 shares fp32's
        fingerprint but not its cache)."""
        if precision == "fp16":
            self.model_for(precision)
            return hashlib.sha256(f"{self.fingerprint}:fp16".encode()).hexdigest()
        return self.fingerprint_for(precision)

    def parity_passed(self, precision: str) -> bool:
        """Whether this backbone's export recorded a passing parity gate for `precision`."""
        if not self.has(precision):
            return False
        least = {
            "fp32": self.parity_min_cosine_fp32,
            "fp16": self.parity_min_cosine_fp16,
            "int8": self.parity_min_cosine_int8,
        }[precision]
        mean_ok = precision != "int8" or self.parity_mean_cosine_int8 >= MIN_MEAN_COSINE_INT8
        return least >= MIN_COSINE[precision] and mean_ok

    @classmethod
    def load(cls, directory: Path) -> BackboneManifest:
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found: {directory} is not an exported backbone (run `headswap export`)"
            ) from None
        return cls.from_dict(data)


def fingerprint(files: list[Path], settings: dict[str, Any]) -> str:
    """sha256 of the files' bytes and the settings that change what the embeddings are."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


# The seal: the sha256 of a head manifest's canonical JSON (every field but the seal; sorted keys, no spaces).
# The manifest records the weights' sha256, so the seal binds the labels, the metrics and everything else
# serving reads to the weights. A manifest written before the seal has none: it is checked as before (the
# weights' sha256 and the field types below), so a label swapped in such a manifest goes unseen until it is
# retrained.
SEAL = "manifest_sha256"
# The typed fields of a head manifest besides its labels, and the JSON types each may have when present.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "spec": (dict,),
    "metrics": (dict,),
    "created_at": (int, float),
    "example_count": (int,),
    "backbone_fingerprint": (str,),
    "weights_sha256": (str,),
    "version": (int,),
}


class ManifestError(ValueError):
    """A head manifest that does not say what was committed (the message says what is wrong with it)."""


def manifest_digest(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != SEAL}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class HeadManifest:
    """A head version's manifest, as the store keeps it (head.json, or PostgreSQL's `manifest` column).

    The fields serving reads are typed; None means the JSON does not have that field (a manifest before
    commit has no `version` and no `weights_sha256`, one written before the seal has no `seal`). Every other
    field (format, config, selection, ood, the backbone binding, promotion...) is kept as it was in `extra`,
    so that `to_json` gives back exactly the JSON `from_json` read: the same keys, values and seal."""

    labels: tuple[str, ...]
    version: int | None = None  # the store's number for the version, set at commit
    weights_sha256: str | None = None  # set at commit
    backbone_fingerprint: str | None = None
    created_at: float | None = None
    example_count: int | None = None
    spec: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    seal: str | None = None  # SEAL: the sha256 of everything else, set at commit
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, what: str = "the manifest") -> HeadManifest:
        """Raises ManifestError ("<what> ...") for a broken seal, or a field serving reads that has the wrong
        type: bytes that do not say what was committed are never served."""
        if not isinstance(data, dict):
            raise ManifestError(f"{what} is not a manifest")
        seal = data.get(SEAL)
        if seal is not None:
            try:
                intact = seal == manifest_digest(data)
            except (TypeError, ValueError):
                intact = False
            if not intact:
                raise ManifestError(
                    f"{what} does not match the sha256 recorded at commit (its labels or fields were changed)"
                )
        labels = data.get("labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(label, str) for label in labels)
            or len(set(labels)) != len(labels)
        ):
            raise ManifestError(f"{what} has no list of distinct labels")
        for key, kinds in FIELD_TYPES.items():
            value = data.get(key)
            if key in data and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ManifestError(f"{what} has a {key} of the wrong type ({type(value).__name__})")
        typed = {name: copy.deepcopy(data[name]) for name in FIELD_TYPES if name in data}
        extra = {
            k: copy.deepcopy(v) for k, v in data.items() if k not in FIELD_TYPES and k not in ("labels", SEAL)
        }
        return cls(labels=tuple(labels), seal=seal, extra=extra, **typed)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON, a fresh copy: the fields that are set, `extra`, and the seal when there is one."""
        data = copy.deepcopy(dict(self.extra))
        data["labels"] = list(self.labels)
        for name in FIELD_TYPES:
            value = getattr(self, name)
            if value is not None:
                data[name] = copy.deepcopy(value)
        if self.seal is not None:
            data[SEAL] = self.seal
        return data

    def committed(self, version: int, weights_sha256: str) -> HeadManifest:
        """The manifest as a store commits it: numbered, bound to its weights, and sealed (the seal computed
        last, over everything else)."""
        numbered = replace(self, version=version, weights_sha256=weights_sha256, seal=None)
        return replace(numbered, seal=manifest_digest(numbered.to_json()))
