"""The promotion gate's second rule: a new version against the tenant's active one, on the same examples.

The comparison must be fair to both heads. The new head's predictions are held-out ones (each made by a
fit that did not see the example); the active version's must be too, so only examples it was not trained
on count. Every version therefore records what it was trained on: the first KEY_BYTES bytes of each
example's content key (sha256 of the input), sorted, in its weights file's header, read only when the
weights are. A version written before that record existed counts as trained on the tenant's stored
examples when it is the latest commit, and is not compared otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import numpy as np

from headswap.adapters import (
    ACTIVE_VERSION,
    GateCheck,
    HeadFormatError,
    HeadModule,
    TrainedHead,
    active_version_check,
    head_from_bytes,
    read_weights_metadata,
)
from headswap.server.domain import Example
from headswap.server.errors import NotFound
from headswap.server.manifest import HeadManifest
from headswap.server.store import HeadStore

TRAINED_ON = "headswap.trained_on"
# Six bytes of sha256 per example: a false match among 50,000 examples has odds of about 1 in 10^5, and
# one only drops that example from the comparison.
KEY_BYTES = 6


def trained_on(examples: Sequence[Example]) -> dict[str, str]:
    """The weights metadata that records which inputs a version was trained on."""
    keys = sorted({e.input.content_key()[:KEY_BYTES] for e in examples})
    return {TRAINED_ON: base64.b64encode(b"".join(keys)).decode("ascii")}


def _recorded(weights: bytes) -> set[bytes] | None:
    try:
        raw = read_weights_metadata(weights).get(TRAINED_ON)
    except HeadFormatError:
        return None
    if raw is None:
        return None
    packed = base64.b64decode(raw)
    return {packed[i : i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)}


def _skipped(version: int, why: str) -> GateCheck:
    return GateCheck(ACTIVE_VERSION, True, 1.0, 0, 0.0, 0.0, version, why)


def compare_with_active(
    store: HeadStore,
    tenant: str,
    comparable: Callable[[HeadManifest], bool],
    head: TrainedHead,
    examples: Sequence[Example],
    vectors: np.ndarray,
    y: np.ndarray,
) -> GateCheck | None:
    """The active-version rule for `head`, trained on `examples` (embedded as `vectors`, labelled `y` as
    indices into its labels), or None when the tenant has no active version. `comparable(manifest)`: whether
    the active version would answer on the embeddings `vectors` came from. Blocking: reads the store and runs
    the active head."""
    try:
        state = store.state(tenant)
    except NotFound:
        return None
    active = state.active_version
    if active == 0:
        return None
    if head.held_out is None:
        return _skipped(active, "trained without validation: no held-out predictions to compare")
    stored = store.load_version(tenant, active)
    if not comparable(stored.manifest):
        return _skipped(active, f"version {active} was trained on another backbone: not compared")
    seen = _recorded(stored.weights)
    if seen is None:
        if active != state.versions[-1]:
            return _skipped(active, f"version {active} does not record its training examples: not compared")
        seen = {e.input.content_key()[:KEY_BYTES] for e in store.examples(tenant)}
    indices = head.held_out.indices
    fresh = np.array(
        [k for k, i in enumerate(indices) if examples[int(i)].input.content_key()[:KEY_BYTES] not in seen],
        dtype=np.int64,
    )
    if fresh.size == 0:
        return active_version_check(np.empty(0, bool), np.empty(0, bool), active)
    rows = indices[fresh]
    loaded = head_from_bytes(stored.weights, stored.manifest.to_json())
    active_labels = np.array(loaded.manifest["labels"], dtype=object)
    predicted = active_labels[HeadModule.from_head(loaded).predict_proba(vectors[rows]).argmax(axis=1)]
    truth = np.array([examples[int(i)].label for i in rows], dtype=object)
    return active_version_check(
        np.asarray(head.held_out.predictions[fresh] == y[rows]), np.asarray(predicted == truth), active
    )
