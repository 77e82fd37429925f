"""Use cases behind the RPCs: embed now; heads come with the head bank."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from pathlib import Path

from headswap.server.backbone import Backbone
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
    """Owns the backbone once it is loaded and warmed up; until then every call is UNAVAILABLE."""

    def __init__(self, config: ServerConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self._backbone: Backbone | None = None

    @property
    def ready(self) -> bool:
        return self._backbone is not None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            raise Unavailable("the server is still loading and warming up its backbone; retry shortly")
        return self._backbone

    def load(self) -> Backbone:
        """Blocking: export if needed, load and warm up. Called once, from a worker thread."""
        directory = ensure_backbone(self.config)
        backbone = Backbone(
            directory,
            device=self.config.device,
            precision=self.config.precision,
            max_run_items=self.config.max_run_items,
            intra_op_threads=self.config.intra_op_threads,
        )
        backbone.warm_up(self.config.warmup_rounds)
        self._backbone = backbone
        return backbone

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
        backbone = self.backbone
        check_texts(texts, self.config.max_batch_inputs, what)
        submitted = time.perf_counter()
        started: list[float] = []

        def work() -> Embedded:
            started.append(time.perf_counter())
            out = backbone.embed_texts(texts)
            timings = Timings(
                queue_s=started[0] - submitted, preprocess_s=out.preprocess_s, backbone_s=out.backbone_s
            )
            return Embedded(out.embeddings, out.truncated, timings)

        return await asyncio.get_running_loop().run_in_executor(self.executor, work)
