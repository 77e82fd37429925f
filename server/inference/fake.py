"""A tiny deterministic backbone for fast in-process tests: no weights, no ONNX Runtime, milliseconds.

A text's "tokens" are its words (each word's hash), at most `max_length` of them; its embedding is the
normalised sum of one random unit vector per word (a bag of words), so equal texts embed equally in any
batch, texts that share words are close, and a head learns labels that words carry. Images are not
supported.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.protocols import Backbone, Prepared
from headswap.server.inference.text import pad
from headswap.server.manifest import BackboneManifest


class FakePreprocessor:
    input_kind = "text"

    def __init__(self, max_length: int = 32) -> None:
        self.max_length = max_length

    def clip(self, item: Input) -> Input:
        return item

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        out = []
        for item in inputs:
            words = str(item.content).split()
            ids = np.array(
                [int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") for w in words],
                dtype=np.int64,
            )
            ids = ids[: self.max_length]
            out.append(Prepared(ids, len(ids), len(ids), truncated=len(words) > self.max_length))
        return out

    def collate(
        self, items: Sequence[Prepared], shape: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        ids, mask = pad(items, shape)
        return {"input_ids": ids, "attention_mask": mask}

    def placeholder(self, length: int) -> Prepared:
        ids = np.ones(max(1, length), dtype=np.int64)
        return Prepared(ids, len(ids), len(ids))

    def warm_up_batches(self, items: int) -> list[list[Input]]:
        return [[Input(text="warm up")] * items]


class FakeEncoder:
    provider = "FakeExecutionProvider"

    def __init__(self, dim: int = 16, precision: str = "fp32") -> None:
        self.dim = dim
        self.precision = precision  # a name only: every precision computes the same vectors
        self.batches: list[int] = []  # items per forward pass, in order
        self.gate = threading.Event()  # clear it to hold forward passes (tests of queueing)
        self.gate.set()
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray], spare_core: bool = False) -> np.ndarray:
        self.gate.wait(30)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for row in range(len(ids)):
            vector = np.zeros(self.dim)
            for token in ids[row][mask[row] == 1]:
                vector += np.random.default_rng(int(token)).standard_normal(self.dim)
            out[row] = vector / max(float(np.linalg.norm(vector)), 1e-12)
        with self._lock:
            self.batches.append(len(ids))
        return out


def fake_backbone(
    dim: int = 16, max_length: int = 32, precision: str = "fp32", name: str = "headswap/fake"
) -> Backbone:
    """A fake backbone served in `precision` (fp32, fp16 or int8: one family, as an export's three models;
    int8 has its own fingerprint, as a real one). Its manifest records passing parity gates."""
    seed = f"fake-{dim}-{max_length}" + ("" if name == "headswap/fake" else f"-{name}")
    fingerprint = hashlib.sha256(seed.encode()).hexdigest()
    manifest = BackboneManifest(
        name=name,
        embedding_dim=dim,
        pooling="none",
        normalization="l2",
        max_length=max_length,
        input_kind="text",
        fingerprint=fingerprint,
        model_fp16="fake_fp16",
        model_int8="fake_int8",
        fingerprint_int8=hashlib.sha256(f"{seed}-int8".encode()).hexdigest(),
        input_names=("input_ids", "attention_mask"),
        parity_min_cosine_fp32=1.0,
        parity_min_cosine_fp16=1.0,
        parity_min_cosine_int8=1.0,
        parity_mean_cosine_int8=1.0,
    )
    return Backbone(manifest, FakePreprocessor(max_length), FakeEncoder(dim, precision))
