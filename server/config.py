"""Server configuration: one frozen dataclass built from flags and `HEADSWAP_*` environment variables.

Precedence: a command-line flag, then the environment variable named in the field's metadata, then the
default. Every field is documented by its `help`; `headswap serve --help` prints them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def default_home() -> Path:
    """Where headswap keeps its data when not told otherwise."""
    if "HEADSWAP_HOME" in os.environ:
        return Path(os.environ["HEADSWAP_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "headswap"


def _opt(env: str, help: str, default: Any = MISSING, **kw: Any) -> Any:
    meta = {"env": env, "help": help}
    if default is MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("HEADSWAP_HOST", "address to listen on for gRPC", "[::]")
    port: int = _opt("HEADSWAP_PORT", "gRPC port (0 picks a free one and logs it)", 50051)
    metrics_port: int = _opt("HEADSWAP_METRICS_PORT", "Prometheus /metrics HTTP port; 0 turns it off", 9090)
    backbone: Path | None = _opt(
        "HEADSWAP_BACKBONE",
        "exported backbone directory; unset means the default all-MiniLM-L6-v2, exported on first start",
        None,
    )
    store: Path | None = _opt("HEADSWAP_STORE", "local store directory for heads and examples", None)
    device: str = _opt("HEADSWAP_DEVICE", "auto, cpu or cuda: where the backbone runs", "auto")
    precision: str = _opt("HEADSWAP_PRECISION", "auto (fp16 on CUDA, fp32 on CPU), fp32 or fp16", "auto")
    max_batch_inputs: int = _opt(
        "HEADSWAP_MAX_BATCH_INPUTS", "most inputs one Embed or Classify call may carry", 1024
    )
    max_message_bytes: int = _opt(
        "HEADSWAP_MAX_MESSAGE_BYTES", "largest gRPC message accepted or sent, in bytes", 32 * 1024 * 1024
    )
    batch_max_items: int = _opt(
        "HEADSWAP_BATCH_MAX_ITEMS",
        "most inputs in one backbone forward pass; 0 = by device (16 on CPU, 256 on CUDA)",
        0,
    )
    batch_max_tokens: int = _opt(
        "HEADSWAP_BATCH_MAX_TOKENS",
        "most padded tokens (inputs x longest) in one forward pass; 0 = by device (4096 on CPU, 65536 on CUDA)",
        0,
    )
    batch_max_wait_ms: float = _opt(
        "HEADSWAP_BATCH_MAX_WAIT_MS", "how long an input may wait for others to share its batch", 2.0
    )
    max_queue_items: int = _opt(
        "HEADSWAP_MAX_QUEUE_ITEMS",
        "inputs waiting for the backbone; past it calls get RESOURCE_EXHAUSTED",
        8192,
    )
    worker_threads: int = _opt(
        "HEADSWAP_WORKER_THREADS", "threads for tokenizing and the backbone (off the event loop)", 2
    )
    intra_op_threads: int = _opt(
        "HEADSWAP_INTRA_OP_THREADS", "ONNX Runtime threads per forward pass; 0 lets it choose", 0
    )
    warmup_rounds: int = _opt(
        "HEADSWAP_WARMUP_ROUNDS", "times the warm-up batches run before the server reports SERVING", 2
    )
    max_examples: int = _opt("HEADSWAP_MAX_EXAMPLES", "most labelled examples stored per tenant", 50_000)
    max_classes: int = _opt("HEADSWAP_MAX_CLASSES", "most labels one head may have", 1000)
    cache_capacity: int = _opt(
        "HEADSWAP_CACHE_CAPACITY", "embeddings kept in memory by the embedding cache (LRU)", 200_000
    )
    train_threads: int = _opt(
        "HEADSWAP_TRAIN_THREADS", "PyTorch threads for head training (the rest stay with serving)", 1
    )
    grace_seconds: float = _opt(
        "HEADSWAP_GRACE_SECONDS", "on SIGTERM, how long calls in flight may take to finish", 20.0
    )
    log_format: str = _opt("HEADSWAP_LOG_FORMAT", "text or json", "text")
    log_level: str = _opt("HEADSWAP_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO")
    home: Path = _opt(
        "HEADSWAP_HOME", "data directory for the default backbone and store", default_factory=default_home
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is outside 0..65535")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics port {self.metrics_port} is outside 0..65535")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.precision not in ("auto", "fp32", "fp16"):
            problems.append(f"precision must be auto, fp32 or fp16, not {self.precision!r}")
        if self.max_batch_inputs < 1:
            problems.append("max batch inputs must be at least 1")
        if self.max_message_bytes < 1024:
            problems.append("max message bytes must be at least 1024")
        if self.max_examples < 2 or self.max_classes < 2:
            problems.append("max examples and max classes must be at least 2")
        if self.cache_capacity < 0 or self.train_threads < 1:
            problems.append("cache capacity must be 0 or more and train threads at least 1")
        if self.batch_max_wait_ms < 0:
            problems.append("batch max wait must be 0 or more")
        if self.warmup_rounds < 0:
            problems.append("warm-up rounds must be 0 or more")
        if (
            min(self.batch_max_items, self.batch_max_tokens) < 0
            or min(self.max_queue_items, self.worker_threads) < 1
        ):
            problems.append("batch limits, queue size and worker threads must be at least 1")
        if self.log_format not in ("text", "json"):
            problems.append(f"log format must be text or json, not {self.log_format!r}")
        if problems:
            raise ValueError("bad configuration: " + "; ".join(problems))

    def batch_limits(self, on_gpu: bool) -> tuple[int, int]:
        """(items, padded tokens) per forward pass. On a CPU small batches win (they stay in cache: measured
        in docs/BENCHMARKS.md); a GPU needs large ones to stay busy."""
        items = self.batch_max_items or (256 if on_gpu else 16)
        tokens = self.batch_max_tokens or (65536 if on_gpu else 4096)
        return items, tokens

    @property
    def backbone_dir(self) -> Path:
        return self.backbone if self.backbone is not None else self.home / "backbones" / "all-MiniLM-L6-v2"

    @property
    def store_dir(self) -> Path:
        return self.store if self.store is not None else self.home / "store"

    @property
    def uses_default_backbone(self) -> bool:
        return self.backbone is None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(
                flag, dest=f.name, default=None, help=f"{f.metadata['help']} [{f.metadata['env']}]"
            )

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = getattr(args, f.name, None) if args is not None else None
            if raw is None:
                raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        return replace(cls(), **values) if values else cls()


def _convert(name: str, annotation: Any, raw: Any) -> Any:
    kind = str(annotation)
    try:
        if "int" in kind and "Path" not in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
        if "Path" in kind:
            return Path(str(raw)).expanduser()
    except ValueError:
        raise ValueError(f"bad configuration: {name} must be a number, not {raw!r}") from None
    return str(raw)
