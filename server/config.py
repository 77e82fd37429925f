"""Server configuration: frozen sections built from flags and `HEADSWAP_*` environment variables.

Every setting is one `Option` in `OPTIONS`: its flag, its environment variable, its help and an explicit
parser that checks the value and names the setting in its error. Precedence: a command-line flag, then the
environment variable, then the default. `headswap serve --help` prints them all.
"""

from __future__ import annotations

import argparse
import os
import re
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
    max_queue_wait_ms: float = 1000.0  # expected wait past which calls are refused at once
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
    max_request_bytes: int = 8 * 1024 * 1024  # of inputs (text or image bytes) in one call
    max_image_bytes: int = 8 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 40_000_000  # width x height, read from the header before anything is decoded
    max_examples: int = 50_000
    max_example_bytes: int = 512 * 1024 * 1024  # of a tenant's stored examples (texts and image bytes)
    max_classes: int = 1000
    max_versions: int = 50  # kept per tenant, besides the active one and its predecessor
    max_resident_head_bytes: int = 512 * 1024 * 1024
    max_train_seconds: float = 300.0
    train_workers: int = 2  # trainings that run at once (each on train_threads threads)


@dataclass(frozen=True)
class StoreConfig:
    # A directory, or a postgresql:// URL shared by replicas; None: <home>/store. Never in repr: it may
    # hold a password.
    url: str | None = field(default=None, repr=False)
    cache_capacity: int = 200_000  # embeddings kept in memory (LRU)
    migrate: bool = False  # create or migrate a PostgreSQL store's schema at start

    @property
    def redacted(self) -> str:
        if self.url is None or "://" not in self.url:
            return str(self.url)
        from headswap.server.store.postgres_schema import redact

        return redact(self.url)


@dataclass(frozen=True)
class AuthConfig:
    mode: str = "none"  # "none": every caller may do everything; "keys": API keys (headswap.server.keys)
    pepper: str | None = field(default=None, repr=False)  # the HMAC key of the stored key digests
    pepper_file: Path | None = None

    def load_pepper(self) -> bytes | None:
        """The pepper's bytes when keys are on (from the file, else the value); None when auth is off."""
        if self.mode == "none":
            return None
        if self.pepper_file is not None:
            raw = self.pepper_file.read_bytes().strip()
        elif self.pepper:
            raw = self.pepper.encode()
        else:
            raise ValueError(
                "bad configuration: --auth keys needs a pepper: --auth-pepper-file FILE or HEADSWAP_AUTH_PEPPER "
                "(32 random bytes or more, e.g. `openssl rand -hex 32`)"
            )
        if len(raw) < 16:
            raise ValueError("bad configuration: the auth pepper must be at least 16 bytes")
        return raw


@dataclass(frozen=True)
class TlsConfig:
    """Files re-read when they change (a renewed certificate serves new connections without a restart)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # set: mutual TLS, every client must present a certificate it signed

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    # (name, directory) per served backbone; empty: the default all-MiniLM-L6-v2, exported on first start.
    # An empty name means "by its input kind" (text, image).
    backbones: tuple[tuple[str, Path], ...] = ()
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
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    health_port: int = 0  # a plaintext port serving grpc.health.v1 only (probes of a TLS server); 0: none

    def __post_init__(self) -> None:
        if (self.tls.cert is None) != (self.tls.key is None):
            raise ValueError("bad configuration: --tls-cert and --tls-key go together")
        if self.tls.client_ca is not None and self.tls.cert is None:
            raise ValueError("bad configuration: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    @property
    def backbone(self) -> Path | None:
        """The first backbone's directory, if any is configured."""
        return self.backbones[0][1] if self.backbones else None

    @property
    def backbone_dir(self) -> Path:
        return self.backbone if self.backbone is not None else self.default_backbone_dir

    @property
    def default_backbone_dir(self) -> Path:
        return self.home / "backbones" / "all-MiniLM-L6-v2"

    @property
    def default_image_backbone_dir(self) -> Path:
        return self.home / "backbones" / "mobilenet_v2"

    @property
    def store_url(self) -> str:
        return self.store.url if self.store.url is not None else str(self.home / "store")

    @property
    def uses_default_backbone(self) -> bool:
        return self.backbone is None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for opt in OPTIONS:
            action = "append" if opt.repeat else "store"
            parser.add_argument(
                opt.flag, dest=opt.key, default=None, action=action, help=f"{opt.help} [{opt.env}]"
            )

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
            name = opt.key.replace("_", " ")
            if opt.repeat:  # a list from repeated flags, or one comma-separated environment variable
                parts = raw if isinstance(raw, list) else [p for p in str(raw).split(",") if p.strip()]
                value: Any = tuple(opt.parse(name, str(p).strip()) for p in parts)
            else:
                value = opt.parse(name, str(raw))
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


_BACKBONE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def backbone_spec(name: str, raw: str) -> tuple[str, Path]:
    """`DIR` or `NAME=DIR`."""
    label, sep, directory = raw.partition("=")
    if not sep:
        return "", Path(raw).expanduser()
    if not _BACKBONE_NAME.fullmatch(label):
        raise _bad(f"{name} {raw!r}: a backbone's name is 1 to 32 of a-z 0-9 _ - (NAME=DIR)")
    return label, Path(directory).expanduser()


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
    repeat: bool = False  # the flag may be given several times; the variable holds a comma-separated list

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
        "backbones",
        backbone_spec,
        "exported backbone directory, or NAME=DIR; repeat to serve several (one text and one image, say); "
        "unset means the default all-MiniLM-L6-v2, exported on first start",
        repeat=True,
    ),
    Option(
        "store",
        "store",
        "url",
        text,
        "where heads and examples live: a directory (one replica) or a postgresql:// URL shared by replicas",
    ),
    Option(
        "store_migrate",
        "store",
        "migrate",
        boolean,
        "create or migrate a PostgreSQL store's schema at start (or run `headswap store migrate`)",
    ),
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
    Option(
        "max_request_bytes",
        "limits",
        "max_request_bytes",
        integer(1024),
        "most bytes of inputs (text or images) in one call; longer texts are cut before tokenizing anyway",
    ),
    Option(
        "max_example_bytes",
        "limits",
        "max_example_bytes",
        integer(1024),
        "most bytes of one tenant's stored examples (texts and encoded images)",
    ),
    Option(
        "max_image_bytes",
        "limits",
        "max_image_bytes",
        integer(1024),
        "most bytes of one encoded image (a larger one gets INVALID_ARGUMENT naming it)",
    ),
    Option(
        "max_image_pixels",
        "limits",
        "max_image_pixels",
        integer(1),
        "most pixels (width x height, read from the header before decoding) of one image",
    ),
    Option(
        "max_queue_wait_ms",
        "batching",
        "max_queue_wait_ms",
        number(0),
        "calls that would wait longer than this for the backbone get RESOURCE_EXHAUSTED at once",
    ),
    Option(
        "max_versions",
        "limits",
        "max_versions",
        integer(1),
        "head versions kept per tenant (the newest; the active one and its predecessor are always kept)",
    ),
    Option(
        "max_resident_head_bytes",
        "limits",
        "max_resident_head_bytes",
        integer(1024),
        "head weights kept in memory; past it the least recently used heads are unloaded",
    ),
    Option(
        "max_train_seconds",
        "limits",
        "max_train_seconds",
        number(1),
        "longest one training may run; longer ones stop with RESOURCE_EXHAUSTED",
    ),
    Option("train_workers", "limits", "train_workers", integer(1), "trainings that may run at once"),
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
    Option(
        "auth",
        "auth",
        "mode",
        choice("none", "keys"),
        "none (every caller may do everything) or keys (API keys)",
    ),
    Option(
        "auth_pepper",
        "auth",
        "pepper",
        text,
        "the secret the stored key digests are keyed with (prefer the file)",
    ),
    Option("auth_pepper_file", "auth", "pepper_file", path, "a file holding the auth pepper"),
    Option(
        "tls_cert",
        "tls",
        "cert",
        path,
        "PEM certificate chain: serve gRPC over TLS (re-read when it changes)",
    ),
    Option("tls_key", "tls", "key", path, "PEM private key of --tls-cert"),
    Option(
        "tls_client_ca",
        "tls",
        "client_ca",
        path,
        "PEM CA bundle: require client certificates it signed (mTLS)",
    ),
    Option(
        "health_port",
        None,
        "health_port",
        PORT,
        "a plaintext port with only grpc.health.v1 on it, for probes that cannot speak TLS; 0 turns it off",
    ),
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
