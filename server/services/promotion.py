"""The promotion gate's second rule: a new version against the tenant's active one, on the same examples.

The comparison must be fair to both heads. The new head's predictions are held-out ones (each made by a
fit that did not see the example); the active version's must be too, so only examples it was not trained
on count. The store keeps the examples of the latest commit; when the active version is that commit,
they are exactly its training set, and the examples new to this training are the fair ones. (When the
active version is older, after a rollback or a held-back training, its training set was in general a
subset of the stored one, so the same rule stays fair, if conservative.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from headswap.adapters import (
    ACTIVE_VERSION,
    GateCheck,
    HeadModule,
    TrainedHead,
    active_version_check,
    head_from_bytes,
)
from headswap.server.domain import Example
from headswap.server.errors import NotFound
from headswap.server.store import HeadStore


def _skipped(version: int, why: str) -> GateCheck:
    return GateCheck(ACTIVE_VERSION, True, 1.0, 0, 0.0, 0.0, version, why)


def compare_with_active(
    store: HeadStore,
    tenant: str,
    fingerprint: str,
    head: TrainedHead,
    examples: Sequence[Example],
    vectors: np.ndarray,
    y: np.ndarray,
) -> GateCheck | None:
    """The active-version rule for `head`, trained on `examples` (embedded as `vectors`, labelled `y` as
    indices into its labels), or None when the tenant has no active version. Blocking: reads the store and
    runs the active head."""
    try:
        active = store.state(tenant).active_version
    except NotFound:
        return None
    if active == 0:
        return None
    if head.held_out is None:
        return _skipped(active, "trained without validation: no held-out predictions to compare")
    stored = store.load_version(tenant, active)
    if stored.manifest.get("backbone_fingerprint") != fingerprint:
        return _skipped(active, f"version {active} was trained on another backbone: not compared")
    seen = {e.input.content_key() for e in store.examples(tenant)}
    fresh = np.array(
        [k for k, i in enumerate(head.held_out.indices) if examples[int(i)].input.content_key() not in seen],
        dtype=np.int64,
    )
    if fresh.size == 0:
        return active_version_check(np.empty(0, bool), np.empty(0, bool), active)
    rows = head.held_out.indices[fresh]
    loaded = head_from_bytes(stored.weights, stored.manifest)
    active_labels = np.array(loaded.manifest["labels"], dtype=object)
    predicted = active_labels[HeadModule.from_head(loaded).predict_proba(vectors[rows]).argmax(axis=1)]
    truth = np.array([examples[int(i)].label for i in rows], dtype=object)
    return active_version_check(
        np.asarray(head.held_out.predictions[fresh] == y[rows]), np.asarray(predicted == truth), active
    )
