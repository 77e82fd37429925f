"""The frozen backbone at run time: one long-lived ONNX Runtime session and its tokenizer.

Everything here is blocking and thread-safe (ONNX Runtime's `run` and the Rust tokenizer may be called from
several threads); the asyncio side calls it through an executor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.manifest import BackboneManifest

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class TokenizedBatch:
    input_ids: np.ndarray  # int64 (n, seq)
    attention_mask: np.ndarray  # int64 (n, seq)
    token_type_ids: np.ndarray  # int64 (n, seq)
    truncated: np.ndarray  # bool (n,)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class EmbedOutput:
    embeddings: np.ndarray  # float32 (n, dim), L2-normalised, input order
    truncated: np.ndarray  # bool (n,)
    preprocess_s: float
    backbone_s: float


class Backbone:
    """Loads an exported backbone directory and embeds text with it."""

    def __init__(
        self,
        directory: Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_run_items: int = 64,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.directory = directory
        self.manifest = BackboneManifest.load(directory)
        if self.manifest.input_kind != "text":
            raise ValueError(f"backbone input kind {self.manifest.input_kind!r} is not supported yet")
        self.max_run_items = max_run_items

        self.tokenizer = Tokenizer.from_file(str(directory / self.manifest.tokenizer))
        self.tokenizer.enable_truncation(max_length=self.manifest.max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        # The batcher pads across requests itself, so it tokenizes without padding.
        self.unpadded_tokenizer = Tokenizer.from_file(str(directory / self.manifest.tokenizer))
        self.unpadded_tokenizer.enable_truncation(max_length=self.manifest.max_length)
        self.unpadded_tokenizer.no_padding()

        wanted = _providers(device, ort.get_available_providers())
        # fp16 pays on a GPU; on a CPU ONNX Runtime runs fp16 kernels slower than fp32 ones.
        use_fp16 = precision == "fp16" or (precision == "auto" and wanted[0] == CUDA)
        model = directory / (self.manifest.model_fp16 if use_fp16 else self.manifest.model_fp32)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(model), sess_options=options, providers=wanted)
        active = self.session.get_providers()
        self.provider = active[0]
        if wanted[0] == CUDA and self.provider != CUDA:
            log.warning("CUDA provider requested but unavailable (CUDA or cuDNN missing); running on CPU")
        self.precision = "fp16" if use_fp16 else "fp32"
        log.info(
            "backbone %s loaded: provider=%s precision=%s fingerprint=%s",
            self.manifest.name,
            self.provider,
            self.precision,
            self.manifest.fingerprint[:12],
        )

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    def tokenize(self, texts: list[str]) -> TokenizedBatch:
        encodings = self.tokenizer.encode_batch(texts)
        return TokenizedBatch(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int64),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
            token_type_ids=np.array([e.type_ids for e in encodings], dtype=np.int64),
            truncated=np.array([len(e.overflowing) > 0 for e in encodings], dtype=bool),
        )

    def encode(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Token ids per text (no padding) and whether each was truncated; the Rust batch API, GIL released."""
        encodings = self.unpadded_tokenizer.encode_batch(texts)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return ids, np.fromiter((len(e.overflowing) > 0 for e in encodings), dtype=bool, count=len(encodings))

    def run_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        """One forward pass over sequences of token ids, padded here to the longest of them."""
        length = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), length), dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return self.run(
            TokenizedBatch(input_ids, mask, np.zeros_like(input_ids), np.zeros(len(ids), dtype=bool))
        )

    def run(self, batch: TokenizedBatch) -> np.ndarray:
        feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        if self.provider == CUDA:
            # I/O binding: inputs go to the device once, the output is written on the device and copied back
            # in one transfer, with no intermediate host buffers from run().
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self.manifest.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
        (out,) = self.session.run([self.manifest.output_name], feeds)
        return np.asarray(out, dtype=np.float32)

    def embed_texts(self, texts: list[str]) -> EmbedOutput:
        """Embed texts in runs of similar length (less padding), returned in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        truncated = np.zeros(len(texts), dtype=bool)
        preprocess = backbone = 0.0
        # Character length is a cheap proxy for token length: sorting by it groups similar lengths.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.max_run_items):
            idx = order[start : start + self.max_run_items]
            t0 = time.perf_counter()
            batch = self.tokenize([texts[i] for i in idx])
            t1 = time.perf_counter()
            out[idx] = self.run(batch)
            t2 = time.perf_counter()
            truncated[idx] = batch.truncated
            preprocess += t1 - t0
            backbone += t2 - t1
        return EmbedOutput(out, truncated, preprocess, backbone)

    def warm_up(self, rounds: int = 1) -> float:
        """Run the shapes a server sees first, so the first caller does not pay for kernel setup."""
        started = time.perf_counter()
        samples = [
            ["warm-up"],
            ["a short sentence to warm the backbone up"] * self.max_run_items,
            ["a sentence of middling length, the kind most callers send, " * 4] * self.max_run_items,
            ["word " * (self.manifest.max_length + 8)] * 2,
        ]
        for _ in range(rounds):
            for texts in samples:
                self.embed_texts(texts)
        seconds = time.perf_counter() - started
        log.info("backbone warm-up done in %.2fs", seconds)
        return seconds


def _providers(device: str, available: list[str]) -> list[Any]:
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return [CUDA, CPU] if CUDA in available and _cuda_device_present() else [CPU]


def _cuda_device_present() -> bool:
    """onnxruntime-gpu lists its CUDA provider even on machines with no GPU; ask the driver instead."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value > 0
    return False
