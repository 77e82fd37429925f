"""The seams of inference: a `Preprocessor` turns inputs into prepared items, an `Encoder` runs a batch.

A prepared item carries its own cost and grouping key, so the batcher needs to know nothing about tokens or
pixels: it budgets batches by cost and puts items with near keys together. A new input kind is a new
preprocessor; a new runtime is a new encoder; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from headswap.server.domain import BackboneDescription, Input
from headswap.server.manifest import BackboneManifest


class Prepared(NamedTuple):
    """One input, ready for a batch (a tuple: one is made per input, so it must be cheap to make)."""

    payload: Any  # what the preprocessor's collate() takes: token ids, pixels
    cost: int  # work this item brings to a batch (tokens, or a fixed cost per image)
    group_key: int  # items with near keys batch with little padding (a text's token length)
    truncated: bool = False


class Preprocessor(Protocol):
    input_kind: str

    def clip(self, item: Input) -> Input:
        """The input as the backbone will see it (a text cut to a bounded length), for storing examples."""
        ...

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        """Blocking and thread-safe; runs in the preprocessing pool, never on the event loop."""
        ...

    def collate(
        self, items: Sequence[Prepared], shape: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """The encoder's feeds for one batch; with `shape` (rows, length; length 0 where inputs have no length
        axis), padded to it with rows and positions that change no item's embedding."""
        ...

    def placeholder(self, length: int) -> Prepared:
        """An item of `length` (tokens; ignored where inputs have no length) for warming bucket shapes up."""
        ...

    def warm_up_batches(self, items: int) -> list[list[Input]]:
        """Inputs whose batches have the shapes serving sees first (warm-up runs them through the batcher)."""
        ...


class Encoder(Protocol):
    dim: int
    provider: str
    precision: str

    def run(self, feeds: Mapping[str, np.ndarray], spare_core: bool = False) -> np.ndarray:
        """Blocking: one forward pass; float32 (n, dim). `spare_core`: the server is refusing calls; an
        encoder on CPU threads runs this pass on one fewer if it can, leaving a core to the event loop."""
        ...


@dataclass(frozen=True)
class Backbone:
    """A loaded backbone: what it is, how its inputs are prepared, and what runs it."""

    manifest: BackboneManifest
    preprocessor: Preprocessor
    encoder: Encoder

    @property
    def fingerprint(self) -> str:
        """The embeddings' identity: it depends on the precision served (int8 has its own; fp32 and fp16
        share one). Two servers of one fingerprint give the same embeddings."""
        return self.manifest.fingerprint_for(self.encoder.precision)

    @property
    def weights(self) -> str:
        """The backbone family's identity (weights, tokenizer, pooling, normalisation): what heads are bound
        to, whatever the precision (`headswap.server.binding`)."""
        return self.manifest.fingerprint

    @property
    def precision(self) -> str:
        return self.encoder.precision

    @property
    def embedding_key(self) -> str:
        """What cached embeddings are keyed by: one key per precision, never shared between two."""
        return self.manifest.embedding_key(self.encoder.precision)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def on_gpu(self) -> bool:
        return self.encoder.provider == "CUDAExecutionProvider"

    def describe(self, served_as: str = "") -> BackboneDescription:
        m = self.manifest
        return BackboneDescription(
            served_as=served_as or m.input_kind,
            name=m.name,
            fingerprint=self.fingerprint,
            embedding_dim=m.embedding_dim,
            input_kind=m.input_kind,
            max_length=m.max_length,
            provider=self.encoder.provider,
            precision=self.encoder.precision,
            weights_fingerprint=self.weights,
        )
