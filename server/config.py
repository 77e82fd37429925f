"""Server configuration: frozen sections built from flags and `HEADSWAP_*` environment variables.

Every setting is one `Option` in `OPTIONS`: its flag, its environment variable, its help and an explicit
parser that checks the value and names the setting in its error. Precedence: a command-line flag, then the
environment variable, then the default. `headswap serve --help` prints them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def default_home() -> Path:
    """Where headswap keeps its data when not told otherwise."""
    if "HEADSWAP_HOME" in os.environ:
        return Path(os.environ["HEADSWAP_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "headswap"


@dataclass(frozen=True)
class BatchingConfig:
    """The dynamic batcher in front of the backbone. 0 for items or cost means: chosen by device."""

    max_items: int = 0
    max_cost: int = 0  # padded tokens (text) per forward pass
    max_wait_ms: float = 2.0
    max_queue_items: int = 8192
    # Most padding a forward pass may carry, as a share of the tokens it computes (1 = no cap): an input whose
    # length would push a batch past it waits for a batch of its own length instead.
    max_padding: float = 0.3

    def limits(self, on_gpu: bool) -> tuple[int, int]:
        """(items, padded cost) per forward pass. On a CPU small batches win (they stay in cache: measured
        in docs/BENCHMARKS.md); a GPU needs large ones to stay busy."""
        return self.max_items or (256 if on_gpu else 16), self.max_cost or (65536 if on_gpu else 4096)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one call may ask for."""

    max_batch_inputs: int = 1024
    max_message_bytes: int = 32 * 1024 * 1024
    max_examples: int = 50_000
    max_classes: int = 1000


@dataclass(frozen=True)
class StoreConfig:
    url: str | None = None  # a directory; None: <home>/store
    cache_capacity: int = 200_000  # embeddings kept in memory (LRU)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    backbone: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    worker_threads: int = 2
    intra_op_threads: int = 0
    # Off: measured on the 2-core CPU (docs/BENCHMARKS.md), spinning threads took the cores from gRPC, the
    # tokenizer and the client, at high load and at low load alike.
    intra_op_spin: bool = False
    warmup_rounds: int = 2
    train_threads: int = 1
    grace_seconds: float = 20.0
    log_format: str = "text"
    log_level: str = "INFO"
    home: Path = field(default_factory=default_home)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def backbone_dir(self) -> Path:
        return self.backbone if self.backbone is not None else self.home / "backbones" / "all-MiniLM-L6-v2"

    @property
    def store_url(self) -> str:
        return self.store.url if self.store.url is not None else str(self.home / "store")

    @property
    def uses_default_backbone(self) -> bool:
        return self.backbone is None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for opt in OPTIONS:
            parser.add_argument(opt.flag, dest=opt.key, default=None, help=f"{opt.help} [{opt.env}]")

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        environ = os.environ if environ is None else environ
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for opt in OPTIONS:
            raw = getattr(args, opt.key, None) if args is not None else None
            if raw is None:
                raw = environ.get(opt.env)
            if raw is None or raw == "":
                continue
            value = opt.parse(opt.key.replace("_", " "), str(raw))
            if opt.section is None:
                top[opt.field] = value
            else:
                sections.setdefault(opt.section, {})[opt.field] = value
        config = cls(**top)
        for name, values in sections.items():
            config = replace(config, **{name: replace(getattr(config, name), **values)})
        return config


# -- parsers: each takes the setting's name (for the message) and the raw string ---------------------------

Parser = Callable[[str, str], Any]


def _bad(message: str) -> ValueError:
    return ValueError(f"bad configuration: {message}")


def integer(low: int | None = None, high: int | None = None) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _bad(f"{name} must be a number, not {raw!r}") from None
        if low is not None and high is not None and not low <= value <= high:
            raise _bad(f"{name} {value} is outside {low}..{high}")
        if low is not None and value < low:
            raise _bad(f"{name} must be at least {low}, not {value}")
        return value

    return parse


def number(low: float = 0.0, high: float | None = None) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _bad(f"{name} must be a number, not {raw!r}") from None
        if not value >= low:
            raise _bad(f"{name} must be at least {low}, not {value}")
        if high is not None and not value <= high:
            raise _bad(f"{name} must be at most {high}, not {value}")
        return value

    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad(f"{name} must be one of {', '.join(_TRUE + _FALSE)}, not {raw!r}")


def choice(*allowed: str, upper: bool = False) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in allowed:
            raise _bad(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {raw!r}")
        return value

    return parse


def path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def text(name: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Option:
    key: str  # flag and env name: --batch-max-items, HEADSWAP_BATCH_MAX_ITEMS
    section: str | None  # the ServerConfig section it sets, None for a top-level field
    field: str
    parse: Parser
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "HEADSWAP_" + self.key.upper()


PORT = integer(0, 65535)
OPTIONS: tuple[Option, ...] = (
    Option("host", None, "host", text, "address to listen on for gRPC"),
    Option("port", None, "port", PORT, "gRPC port (0 picks a free one and logs it)"),
    Option("metrics_port", None, "metrics_port", PORT, "Prometheus /metrics HTTP port; 0 turns it off"),
    Option(
        "backbone",
        None,
        "backbone",
        path,
        "exported backbone directory; unset means the default all-MiniLM-L6-v2, exported on first start",
    ),
    Option("store", "store", "url", text, "local store directory for heads and examples"),
    Option(
        "device", None, "device", choice("auto", "cpu", "cuda"), "auto, cpu or cuda: where the backbone runs"
    ),
    Option(
        "precision",
        None,
        "precision",
        choice("auto", "fp32", "fp16", "int8"),
        "auto (fp16 on CUDA, int8 on a CPU with VNNI, fp32 on other CPUs), fp32, fp16 or int8; an int8 "
        "backbone has its own fingerprint, so heads trained on another precision are refused",
    ),
    Option(
        "max_batch_inputs",
        "limits",
        "max_batch_inputs",
        integer(1),
        "most inputs one Embed or Classify call may carry",
    ),
    Option(
        "max_message_bytes",
        "limits",
        "max_message_bytes",
        integer(1024),
        "largest gRPC message accepted or sent, in bytes",
    ),
    Option(
        "batch_max_items",
        "batching",
        "max_items",
        integer(0),
        "most inputs in one backbone forward pass; 0 = by device (16 on CPU, 256 on CUDA)",
    ),
    Option(
        "batch_max_tokens",
        "batching",
        "max_cost",
        integer(0),
        "most padded tokens (inputs x longest) in one forward pass; 0 = by device (4096 on CPU, 65536 on CUDA)",
    ),
    Option(
        "batch_max_wait_ms",
        "batching",
        "max_wait_ms",
        number(0),
        "how long an input may wait for others to share its batch",
    ),
    Option(
        "batch_max_padding",
        "batching",
        "max_padding",
        number(0, 1),
        "most padding in one forward pass, as a share of its tokens (1 = no cap)",
    ),
    Option(
        "max_queue_items",
        "batching",
        "max_queue_items",
        integer(1),
        "inputs waiting for the backbone; past it calls get RESOURCE_EXHAUSTED",
    ),
    Option(
        "worker_threads",
        None,
        "worker_threads",
        integer(1),
        "threads for preprocessing inputs (off the event loop)",
    ),
    Option(
        "intra_op_threads",
        None,
        "intra_op_threads",
        integer(0),
        "ONNX Runtime threads per forward pass; 0 lets it choose",
    ),
    Option(
        "intra_op_spin",
        None,
        "intra_op_spin",
        boolean,
        "whether ONNX Runtime's threads busy-wait between operators (default false: they sleep and leave "
        "the cores to gRPC, tokenizing and other work; true may help a machine that does nothing else)",
    ),
    Option(
        "warmup_rounds",
        None,
        "warmup_rounds",
        integer(0),
        "times the warm-up batches run before the server reports SERVING",
    ),
    Option("max_examples", "limits", "max_examples", integer(2), "most labelled examples stored per tenant"),
    Option("max_classes", "limits", "max_classes", integer(2), "most labels one head may have"),
    Option(
        "cache_capacity",
        "store",
        "cache_capacity",
        integer(0),
        "embeddings kept in memory by the embedding cache (LRU)",
    ),
    Option(
        "train_threads",
        None,
        "train_threads",
        integer(1),
        "PyTorch threads for head training (the rest stay with serving)",
    ),
    Option(
        "grace_seconds",
        None,
        "grace_seconds",
        number(0),
        "on SIGTERM, how long calls in flight may take to finish",
    ),
    Option("log_format", None, "log_format", choice("text", "json"), "text or json"),
    Option(
        "log_level",
        None,
        "log_level",
        choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        "DEBUG, INFO, WARNING or ERROR",
    ),
    Option("home", None, "home", path, "data directory for the default backbone and store"),
)


def setting_names() -> set[str]:
    """Every HEADSWAP_* environment variable the server reads."""
    return {opt.env for opt in OPTIONS}


def _check_options() -> None:
    """Each option names a real field: a typo here would silently drop a setting."""
    top = {f.name for f in fields(ServerConfig)}
    for opt in OPTIONS:
        target = (
            top if opt.section is None else {f.name for f in fields(getattr(ServerConfig(), opt.section))}
        )
        if opt.field not in target:
            raise AssertionError(f"option {opt.key} sets unknown field {opt.section}.{opt.field}")


_check_options()
