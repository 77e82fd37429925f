"""Use cases behind the RPCs: embed now; heads come with the head bank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headswap.server.backbone import Backbone
from headswap.server.batcher import Batcher, BatchPolicy, BatchStats, GroupedHeads
from headswap.server.config import ServerConfig
from headswap.server.domain import BackboneDescription, Embedded, Timings
from headswap.server.errors import Unavailable
from headswap.server.validation import check_texts

log = logging.getLogger(__name__)


def ensure_backbone(config: ServerConfig) -> Path:
    """The backbone directory to serve, exporting the default one on first start."""
    directory = config.backbone_dir
    if (directory / "manifest.json").exists():
        return directory
    if not config.uses_default_backbone:
        raise FileNotFoundError(
            f"--backbone {directory} is not an exported backbone (no manifest.json); "
            "run `headswap export --out DIR` or leave --backbone unset for the default"
        )
    from headswap.server.export import export_backbone

    log.info("default backbone not found at %s: exporting it (once)", directory)
    report = export_backbone(directory)
    log.info("exported default backbone in %.1fs", report.seconds)
    return directory


class EmbeddingService:
    """Owns the backbone and its batcher once loaded and warmed up; until then every call is UNAVAILABLE."""

    def __init__(self, config: ServerConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self._backbone: Backbone | None = None
        self._batcher: Batcher | None = None
        # Tokenizing and the backbone run in their own threads, so one overlaps the other.
        self.tokenize_executor = ThreadPoolExecutor(
            config.worker_threads, thread_name_prefix="headswap-tokenize"
        )
        self.backbone_executor = ThreadPoolExecutor(1, thread_name_prefix="headswap-backbone")

    @property
    def ready(self) -> bool:
        return self._batcher is not None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None or self._batcher is None:
            raise Unavailable("the server is still loading and warming up its backbone; retry shortly")
        return self._backbone

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise Unavailable("the server is still loading and warming up its backbone; retry shortly")
        return self._batcher

    def load(self) -> Backbone:
        """Blocking: export if needed, load and warm up. Called once, from a worker thread."""
        directory = ensure_backbone(self.config)
        backbone = Backbone(
            directory,
            device=self.config.device,
            precision=self.config.precision,
            intra_op_threads=self.config.intra_op_threads,
        )
        # Warm up with the batch shapes the batcher will use on this device.
        backbone.max_run_items = self.config.batch_limits(backbone.provider == "CUDAExecutionProvider")[0]
        backbone.warm_up(self.config.warmup_rounds)
        return backbone

    def activate(
        self,
        backbone: Backbone,
        heads: GroupedHeads | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        """On the event loop: start the batcher; from now on calls are served."""
        items, tokens = self.config.batch_limits(backbone.provider == "CUDAExecutionProvider")
        log.info("batches of at most %d inputs and %d padded tokens", items, tokens)
        policy = BatchPolicy(
            max_batch_tokens=tokens,
            max_batch_items=items,
            max_wait_s=self.config.batch_max_wait_ms / 1000.0,
            max_queue_items=self.config.max_queue_items,
        )
        batcher = Batcher(backbone, policy, self.tokenize_executor, self.backbone_executor, heads, on_batch)
        batcher.start()
        self._backbone = backbone
        self._batcher = batcher

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        for pool in (self.tokenize_executor, self.backbone_executor):
            pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> BackboneDescription:
        b = self.backbone
        m = b.manifest
        return BackboneDescription(
            name=m.name,
            fingerprint=m.fingerprint,
            embedding_dim=m.embedding_dim,
            input_kind=m.input_kind,
            max_length=m.max_length,
            provider=b.provider,
        )

    async def embed(self, texts: list[str], what: str = "inputs") -> Embedded:
        check_texts(texts, self.config.max_batch_inputs, what)
        result = await self.batcher.submit(texts)
        embeddings = np.stack(result.rows) if result.rows else np.zeros((0, self.backbone.dim), np.float32)
        timings = Timings(
            queue_s=result.queue_s, preprocess_s=result.tokenize_s, backbone_s=result.backbone_s
        )
        return Embedded(embeddings, result.truncated, timings)
