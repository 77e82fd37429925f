"""Server configuration: frozen sections built from flags and `HEADSWAP_*` environment variables.

Every setting is declared once, as an `Option` in `OPTIONS` (`options.py`): its flag, its environment
variable, its help, its default and an explicit parser that checks the value and names the setting in its
error. A section's field says only its type: its default is the option's (`DECLARED`, filled in by
`@declared`), and the objects built from a section (`BatchingConfig.policy`) take its values. Precedence: a
command-line flag, then the environment variable, then the default. `headswap serve --help` prints them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from headswap.server.inference.policy import BatchPolicy
from headswap.server.options import OPTIONS, Option, default_home
from headswap.server.parsers import boolean

__all__ = [
    "OPTIONS",
    "AuthConfig",
    "BatchingConfig",
    "LimitsConfig",
    "Option",
    "ServerConfig",
    "StoreConfig",
    "TlsConfig",
    "default_home",
    "setting_names",
]


def warn_if_readable_by_others(path: Path, what: str) -> bool:
    """Log a warning when a secret's file can be read by other users (as ssh does for private keys): by
    anyone, or by a group other than this process's own (Kubernetes' fsGroup mounts secrets group-readable
    for the pod's own group, which is no one else). Returns whether it warned."""
    import logging
    import stat

    try:
        info = path.stat()
    except OSError:
        return False  # not there: reading it will say so
    mode = stat.S_IMODE(info.st_mode)
    open_to = []
    if mode & stat.S_IROTH:
        open_to.append("everyone")
    if mode & stat.S_IRGRP and info.st_gid not in (os.getegid(), *os.getgroups()):
        open_to.append(f"group {info.st_gid}")
    if not open_to:
        return False
    logging.getLogger("headswap.server.config").warning(
        "%s %s is readable by %s (mode %04o): `chmod 600 %s` (Kubernetes: mount its Secret with "
        "defaultMode 0400)",
        what, path, " and ".join(open_to), mode, path,
    )  # fmt: skip
    return True


# A field's default, as its option declares it (filled in by `declared`, before `dataclass` reads it).
DECLARED: Any = object()
_Section = TypeVar("_Section", bound=type)


def declared(section: str | None) -> Callable[[_Section], _Section]:
    """Give each field of a config section (None: ServerConfig's own) its option's default; every field
    marked DECLARED must have an option and every option of the section a field (a typo would silently drop
    a setting)."""

    def fill(cls: _Section) -> _Section:
        unfilled = {name for name in cls.__annotations__ if _default(getattr(cls, name, None)) is DECLARED}
        for opt in (opt for opt in OPTIONS if opt.section == section):
            if opt.field not in unfilled:
                raise AssertionError(f"option {opt.key} sets unknown field {section}.{opt.field}")
            unfilled.discard(opt.field)
            current = getattr(cls, opt.field)
            target = current if isinstance(current, Field) else field()
            if opt.factory is not None:
                target.default, target.default_factory = MISSING, opt.factory
            else:
                target.default = opt.default
            setattr(cls, opt.field, target)
        if unfilled:
            raise AssertionError(f"{cls.__name__} fields without an option: {sorted(unfilled)}")
        return cls

    return fill


def _default(attribute: object) -> object:
    return attribute.default if isinstance(attribute, Field) else attribute


@dataclass(frozen=True)
@declared("batching")
class BatchingConfig:
    """The dynamic batcher in front of the backbone. 0 for items or cost means: chosen by device."""

    max_items: int = DECLARED
    max_cost: int = DECLARED  # padded tokens (text) per forward pass
    max_wait_ms: float = DECLARED
    max_queue_items: int = DECLARED
    max_queue_wait_ms: float = DECLARED  # expected wait past which calls are refused at once
    # How far behind the event loop may run before new Embed and Classify calls are refused at the door
    # (rpc/overload.py); 0: never, the default (bench.overload, 2026-12-07: at 3x capacity on 2 cores,
    # shedding at 50 ms made refusals slower, p50 132-381 ms against 34 ms without it, for no more goodput).
    max_loop_lag_ms: float = DECLARED
    # Most padding a forward pass may carry, as a share of the tokens it computes (1 = no cap): an input whose
    # length would push a batch past it waits for a batch of its own length instead.
    max_padding: float = DECLARED
    # Pad every forward pass to one of a few fixed shapes, all run at warm-up (inference/buckets.py): "auto"
    # is on for CUDA (its first run of a new shape costs 10-40 ms) and off on a CPU (padding is pure cost).
    shape_buckets: str = DECLARED

    def buckets_on(self, on_gpu: bool) -> bool:
        return self.shape_buckets == "on" or (self.shape_buckets == "auto" and on_gpu)

    def policy(self, on_gpu: bool) -> BatchPolicy:
        """The batcher's policy. 0 items or cost: by device. On a CPU small batches win (they stay in cache:
        measured in docs/BENCHMARKS.md); a GPU needs large ones to stay busy."""
        return BatchPolicy(
            max_batch_cost=self.max_cost or (65536 if on_gpu else 4096),
            max_batch_items=self.max_items or (256 if on_gpu else 16),
            max_wait_s=self.max_wait_ms / 1000.0,
            max_queue_items=self.max_queue_items,
            max_queue_wait_s=self.max_queue_wait_ms / 1000.0,
            max_padding=self.max_padding,
        )


@dataclass(frozen=True)
@declared("limits")
class LimitsConfig:
    """Bounds on what one call may ask for."""

    max_batch_inputs: int = DECLARED
    max_message_bytes: int = DECLARED
    max_request_bytes: int = DECLARED  # of inputs (text or image bytes) in one call
    max_image_bytes: int = DECLARED  # one encoded image
    max_image_pixels: int = DECLARED  # width x height, read from the header before anything is decoded
    max_examples: int = DECLARED
    max_example_bytes: int = DECLARED  # of a tenant's stored examples (texts and image bytes)
    max_classes: int = DECLARED
    max_versions: int = DECLARED  # kept per tenant, besides the active one and its predecessor
    max_resident_head_bytes: int = DECLARED
    max_train_seconds: float = DECLARED
    train_workers: int = DECLARED  # trainings that run at once (each on train_threads threads)


@dataclass(frozen=True)
@declared("store")
class StoreConfig:
    # A directory, or a postgresql:// URL shared by replicas; None: <home>/store. Never in repr: it may
    # hold a password.
    url: str | None = field(default=DECLARED, repr=False)
    cache_capacity: int = DECLARED  # embeddings kept in memory (LRU)
    # "tenant": no tenant sees another's cached vectors; "shared": for tenants of one organisation.
    cache_scope: str = DECLARED
    migrate: bool = DECLARED  # create or migrate a PostgreSQL store's schema at start

    @property
    def redacted(self) -> str:
        if self.url is None or "://" not in self.url:
            return str(self.url)
        from headswap.server.store.postgres_schema import redact

        return redact(self.url)


@dataclass(frozen=True)
@declared("auth")
class AuthConfig:
    mode: str = DECLARED  # "none": every caller may do everything; "keys": API keys (headswap.server.keys)
    pepper: str | None = field(default=DECLARED, repr=False)  # the HMAC key of the stored key digests
    pepper_file: Path | None = DECLARED

    def load_pepper(self) -> bytes | None:
        """The pepper's bytes when keys are on (from the file, else the value); None when auth is off."""
        if self.mode == "none":
            return None
        if self.pepper_file is not None:
            warn_if_readable_by_others(self.pepper_file, "the auth pepper file")
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
@declared("tls")
class TlsConfig:
    """Files re-read when they change (a renewed certificate serves new connections without a restart)."""

    cert: Path | None = DECLARED
    key: Path | None = DECLARED
    client_ca: Path | None = DECLARED  # set: mutual TLS, every client must present a certificate it signed

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
@declared(None)
class ServerConfig:
    host: str = DECLARED
    port: int = DECLARED  # 0: a free one, logged
    metrics_port: int = DECLARED
    # (name, directory) per served backbone; empty: the default all-MiniLM-L6-v2, exported on first start.
    # An empty name means "by its input kind" (text, image).
    backbones: tuple[tuple[str, Path], ...] = DECLARED
    device: str = DECLARED
    precision: str = DECLARED
    # A head answers on any precision of the backbone weights it was trained on; strict: only on embeddings
    # of the fingerprint it was trained on (int8 has its own; fp32 and fp16 share one).
    strict_precision: bool = DECLARED
    worker_threads: int = DECLARED  # preprocessing threads
    event_loop: str = DECLARED  # auto (uvloop where installed), uvloop, asyncio
    cpu_policy: str = DECLARED  # normal, batch (SCHED_BATCH: server/scheduling.py)
    # Server processes sharing the port (server/workers.py); 0: one without a GPU, enough to feed one with.
    workers: int = DECLARED
    intra_op_threads: int = DECLARED  # ONNX Runtime's; 0: its own choice
    # Off: measured on the 2-core CPU (docs/BENCHMARKS.md), spinning threads took the cores from gRPC, the
    # tokenizer and the client, at high load and at low load alike.
    intra_op_spin: bool = DECLARED
    # Under overload the event loop needs a core to refuse calls in milliseconds; measured on 2 cores, a forward
    # pass on one thread fewer then cost no goodput (docs/BENCHMARKS.md, "Overload: admission control").
    overload_spare_core: bool = DECLARED
    warmup_rounds: int = DECLARED
    train_threads: int = DECLARED  # PyTorch's, for head training
    grace_seconds: float = DECLARED  # on SIGTERM, for the calls in flight
    log_format: str = DECLARED
    log_level: str = DECLARED
    home: Path = DECLARED  # the default backbone and store live there
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    health_port: int = (
        DECLARED  # a plaintext port serving grpc.health.v1 only (probes of a TLS server); 0: none
    )

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
            described = f"{opt.help} [{opt.env}]".replace("%", "%%")  # argparse formats help with %
            if opt.parse is boolean:  # `--flag` / `--no-flag`, as argparse users expect; `--flag false` too
                parser.add_argument(
                    opt.flag,
                    dest=opt.key,
                    default=None,
                    nargs="?",
                    const="true",
                    metavar="BOOL",
                    help=described,
                )
                parser.add_argument(
                    "--no-" + opt.flag[2:],
                    dest=opt.key,
                    action="store_const",
                    const="false",
                    help=f"turn {opt.flag} off",
                )
                continue
            action = "append" if opt.repeat else "store"
            parser.add_argument(opt.flag, dest=opt.key, default=None, action=action, help=described)

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


def setting_names() -> set[str]:
    """Every HEADSWAP_* environment variable the server reads."""
    return {opt.env for opt in OPTIONS}
