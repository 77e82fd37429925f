"""What a head is bound to: the backbone's weights, not the precision they run in.

A head is trained on embeddings of one backbone family (weights, tokenizer, pooling, normalisation), named by
the fp32 fingerprint, `BackboneManifest.fingerprint`; it records the precision those embeddings came in and
their own fingerprint (int8 has its own; fp32 and fp16 share one). Any replica that serves the same weights
answers it, in whatever precision it serves, as long as that precision's export passed its parity gate:
int8 stays within about 0.1 point of fp32 on Banking77 and SST-2 (docs/BENCHMARKS.md), so refusing a head
across precisions would protect nothing measured, and would split a fleet of mixed CPUs (or GPUs in fp16
beside CPUs) into replicas that serve some tenants only. Such answers are counted
(`headswap_cross_precision_predictions_total`) and each reply says both precisions.

`--strict-precision` keeps the older rule: a head answers only on embeddings of the fingerprint it was trained
on. A head of other weights is refused either way, with the backbone that would serve it named.

Heads stored before this record existed carry only the fingerprint of their embeddings: an fp32/fp16 one is
the weights' own fingerprint; an int8 one is mapped to its weights through the manifests of the backbones
served here. Neither recorded its precision (an int8 fingerprint says int8; the fp32 one is fp32 or fp16).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from headswap.server.errors import FailedPrecondition
from headswap.server.manifest import PRECISIONS, BackboneManifest

# The fields a head version's manifest records about its backbone.
FINGERPRINT = "backbone_fingerprint"  # of the embeddings trained on (precision-specific)
WEIGHTS = "backbone_weights"  # of the weights: the family (the fp32 fingerprint)
PRECISION = "backbone_precision"  # "fp32", "fp16" or "int8"
NAME = "backbone_name"  # e.g. "sentence-transformers/all-MiniLM-L6-v2"
UNRECORDED = "unrecorded"  # the metric's label for a head that predates the record


@dataclass(frozen=True)
class HeadBinding:
    """What one head version was trained on."""

    fingerprint: str  # the embeddings' fingerprint
    weights: str  # the backbone family's
    precision: str  # "" when not recorded (a head stored before it was: fp32 or fp16)
    name: str = ""  # the backbone's name, "" when not recorded


@dataclass(frozen=True)
class ServedBackbone:
    """A backbone as this server serves it."""

    weights: str
    fingerprint: str
    precision: str
    name: str
    served_as: str
    parity_passed: bool  # its export recorded a passing parity gate for this precision
    aliases: Mapping[str, str]  # every fingerprint of its family -> the precision it names ("": fp32/fp16)

    @classmethod
    def of(cls, manifest: BackboneManifest, precision: str, served_as: str = "") -> ServedBackbone:
        aliases = {manifest.fingerprint: ""}
        if manifest.fingerprint_int8:
            aliases[manifest.fingerprint_int8] = "int8"
        return cls(
            weights=manifest.fingerprint,
            fingerprint=manifest.fingerprint_for(precision),
            precision=precision,
            name=manifest.name,
            served_as=served_as or manifest.input_kind,
            parity_passed=manifest.parity_passed(precision),
            aliases=aliases,
        )

    @classmethod
    def exact(cls, fingerprint: str) -> ServedBackbone:
        """A backbone known only by its fingerprint (tests of the bank): it serves heads of that fingerprint."""
        return cls(fingerprint, fingerprint, "", "", "", True, {fingerprint: ""})

    def describe(self) -> str:
        where = f"{self.served_as}: " if self.served_as else ""
        precision = f" in {self.precision}" if self.precision else ""
        return f"{where}{self.name or 'a backbone'} (weights {self.weights[:12]}){precision}"


def binding_fields(manifest: BackboneManifest, precision: str) -> dict[str, str]:
    """What a new head version records about the backbone its examples were embedded by."""
    return {
        FINGERPRINT: manifest.fingerprint_for(precision),
        WEIGHTS: manifest.fingerprint,
        PRECISION: precision,
        NAME: manifest.name,
    }


class Bindings:
    """The rule that says which served backbone answers a head, one place for the bank, Classify and GetHead."""

    def __init__(self, served: Iterable[ServedBackbone], strict: bool = False) -> None:
        self.served = {b.weights: b for b in served}
        self.strict = strict
        self._aliases = {fp: (b.weights, p) for b in self.served.values() for fp, p in b.aliases.items()}

    def of(self, manifest: Mapping[str, Any]) -> HeadBinding:
        """What a stored version was trained on; a head from before the record is mapped to its weights."""
        fingerprint = str(manifest.get(FINGERPRINT, ""))
        weights = str(manifest.get(WEIGHTS, ""))
        precision = str(manifest.get(PRECISION, ""))
        if precision not in PRECISIONS:
            precision = ""
        if not weights:
            weights, precision = self._aliases.get(fingerprint, (fingerprint, ""))
        return HeadBinding(fingerprint, weights, precision, str(manifest.get(NAME, "")))

    def is_cross(self, binding: HeadBinding, served: ServedBackbone) -> bool:
        """Whether `served` answers the head in another precision than it was trained on."""
        if binding.precision and served.precision:
            return binding.precision != served.precision
        return binding.fingerprint != served.fingerprint

    def serving(self, binding: HeadBinding) -> ServedBackbone | None:
        """The backbone that answers the head here, or None where it is refused (`check` says why)."""
        served = self.served.get(binding.weights)
        if served is None:
            return None
        if self.strict and binding.fingerprint != served.fingerprint:
            return None
        if self.is_cross(binding, served) and not served.parity_passed:
            return None
        return served

    def check(self, tenant: str, version: int, binding: HeadBinding) -> ServedBackbone:
        """The backbone that answers the head here; FAILED_PRECONDITION, saying what would serve it, if none."""
        served = self.serving(binding)
        if served is not None:
            return served
        head = f"tenant {tenant!r} version {version}"
        here = self.served.get(binding.weights)
        trained = binding.precision or "fp32/fp16"
        if here is None:
            what = (
                f"backbone {binding.name} (weights {binding.weights[:12]})"
                if binding.name
                else f"the backbone whose manifest.json has fingerprint {binding.fingerprint[:12]}"
            )
            runs = "; ".join(b.describe() for b in self.served.values()) or "no backbone"
            raise FailedPrecondition(
                f"{head} was trained on {what}, which this server does not serve (it serves {runs}): send the "
                f"tenant's calls to a replica that serves it (`headswap serve --backbone DIR` with that backbone's "
                "exported directory), or retrain the tenant on this server's backbone with AdaptHead"
            )
        if self.strict and binding.fingerprint != here.fingerprint:
            raise FailedPrecondition(
                f"{head} was trained on {trained} embeddings of {here.name or 'this backbone'}, and this server "
                f"serves it in {here.precision} with --strict-precision: send the tenant's calls to a replica "
                f"serving --precision {binding.precision or 'fp32'}, or serve without --strict-precision (the "
                "weights are the same)"
            )
        raise FailedPrecondition(
            f"{head} was trained on {trained} embeddings, and this server serves {here.name or 'its backbone'} "
            f"in {here.precision}, whose export records no passing parity gate: export the backbone again "
            f"(`headswap export --force`), or serve it with --precision {binding.precision or 'fp32'}"
        )
