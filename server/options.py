"""Every setting of `headswap serve`, declared once as an `Option`: its flag and environment variable (from
its key), the `ServerConfig` section and field it sets, an explicit parser that checks the value and names the
setting in its error, its default and its help. Everything else is built from this table: the sections'
defaults (`config.py`), the command line and the environment (`ServerConfig.add_arguments`, `from_sources`),
and the policy objects made from the sections (`BatchingConfig.policy`). Adding a setting is a row here, a
typed field in its section (whose default is this row's) and its use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headswap.server.parsers import (
    Parser,
    backbone_spec,
    boolean,
    choice,
    integer,
    number,
    path,
    text,
)


def default_home() -> Path:
    """Where headswap keeps its data when not told otherwise."""
    if "HEADSWAP_HOME" in os.environ:
        return Path(os.environ["HEADSWAP_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "headswap"


@dataclass(frozen=True)
class Option:
    key: str  # flag and env name: --batch-max-items, HEADSWAP_BATCH_MAX_ITEMS
    section: str | None  # the ServerConfig section it sets, None for a top-level field
    parse: Parser
    default: Any  # what the field holds when neither the flag nor the variable is given
    help: str
    field: str = ""  # the field it sets in its section; "" (most): the key
    repeat: bool = False  # the flag may be given several times; the variable holds a comma-separated list
    factory: Callable[[], Any] | None = None  # a default computed when a config is made, instead of `default`

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.key)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "HEADSWAP_" + self.key.upper()


PORT = integer(0, 65535)
OPTIONS: tuple[Option, ...] = (
    Option("host", None, text, "[::]", "address to listen on for gRPC"),
    Option("port", None, PORT, 50051, "gRPC port (0 picks a free one and logs it)"),
    Option("metrics_port", None, PORT, 9090, "Prometheus /metrics HTTP port; 0 turns it off"),
    Option(
        "backbone",
        None,
        backbone_spec,
        (),
        "exported backbone directory, or NAME=DIR; repeat to serve several (one text and one image, say); "
        "unset means the default all-MiniLM-L6-v2, exported on first start",
        field="backbones",
        repeat=True,
    ),
    Option(
        "store",
        "store",
        text,
        None,
        "where heads and examples live: a directory (one replica) or a postgresql:// URL shared by replicas",
        field="url",
    ),
    Option(
        "store_migrate",
        "store",
        boolean,
        False,
        "create or migrate a PostgreSQL store's schema at start (or run `headswap store migrate`)",
        field="migrate",
    ),
    Option(
        "device", None, choice("auto", "cpu", "cuda"), "auto", "auto, cpu or cuda: where the backbone runs"
    ),
    Option(
        "precision",
        None,
        choice("auto", "fp32", "fp16", "int8"),
        "auto",
        "auto (fp16 on CUDA, fp32 on CPUs: the model's own numbers), fp32, fp16 or int8 (faster on CPUs, "
        "embeddings about 0.5% off fp32's; README: Precision); a head trained on any precision of the same "
        "backbone weights is served",
    ),
    Option(
        "strict_precision",
        None,
        boolean,
        False,
        "refuse (FAILED_PRECONDITION) a head trained on embeddings of another fingerprint than the one served "
        "(int8 has its own; fp32 and fp16 share one); off (default): served, and counted in "
        "headswap_cross_precision_predictions_total",
    ),
    Option(
        "max_batch_inputs", "limits", integer(1), 1024, "most inputs one Embed or Classify call may carry"
    ),
    Option(
        "max_message_bytes",
        "limits",
        integer(1024),
        32 * 1024 * 1024,
        "largest gRPC message accepted or sent, in bytes",
    ),
    Option(
        "batch_max_items",
        "batching",
        integer(0),
        0,
        "most inputs in one backbone forward pass; 0 = by device (16 on CPU, 256 on CUDA)",
        field="max_items",
    ),
    Option(
        "batch_max_tokens",
        "batching",
        integer(0),
        0,
        "most padded tokens (inputs x longest) in one forward pass; 0 = by device (4096 on CPU, 65536 on CUDA)",
        field="max_cost",
    ),
    Option(
        "batch_max_wait_ms",
        "batching",
        number(0),
        2.0,
        "how long an input may wait for others to share its batch",
        field="max_wait_ms",
    ),
    Option(
        "batch_max_padding",
        "batching",
        number(0, 1),
        0.3,
        "most padding in one forward pass, as a share of its tokens (1 = no cap)",
        field="max_padding",
    ),
    Option(
        "shape_buckets",
        "batching",
        choice("auto", "on", "off"),
        "auto",
        "pad every forward pass to one of a few fixed (rows, length) shapes, all run at warm-up: auto (on for "
        "CUDA, whose first run of a new shape costs 10-40 ms; off on a CPU, where padding is pure cost), on, off",
    ),
    Option(
        "max_queue_items",
        "batching",
        integer(1),
        8192,
        "inputs waiting for the backbone; past it calls get RESOURCE_EXHAUSTED",
    ),
    Option(
        "workers",
        None,
        integer(0),
        0,
        "server processes sharing the gRPC port (SO_REUSEPORT), each with its own backbone session and event "
        "loop; 0 = by machine: 1 without a GPU, 4 with one (what it takes to keep an H200 busy)",
    ),
    Option("worker_threads", None, integer(1), 2, "threads for preprocessing inputs (off the event loop)"),
    Option(
        "event_loop", None, choice("auto", "uvloop", "asyncio"), "auto", "auto: uvloop if installed; asyncio"
    ),
    Option("cpu_policy", None, choice("normal", "batch"), "normal", "batch: Linux SCHED_BATCH, for workers"),
    Option(
        "intra_op_threads", None, integer(0), 0, "ONNX Runtime threads per forward pass; 0 lets it choose"
    ),
    Option(
        "intra_op_spin",
        None,
        boolean,
        False,
        "whether ONNX Runtime's threads busy-wait between operators (default false: they sleep and leave "
        "the cores to gRPC, tokenizing and other work; true may help a machine that does nothing else)",
    ),
    Option(
        "overload_spare_core",
        None,
        boolean,
        True,
        "while calls are being refused (overload), run CPU forward passes on one ONNX Runtime thread fewer, "
        "leaving a core to the event loop that refuses and answers calls (a second session of the model: "
        "its weights once more in memory); no effect on a GPU or with one thread",
    ),
    Option(
        "warmup_rounds",
        None,
        integer(0),
        2,
        "times the warm-up batches run before the server reports SERVING",
    ),
    Option(
        "max_request_bytes",
        "limits",
        integer(1024),
        8 * 1024 * 1024,
        "most bytes of inputs (text or images) in one call; longer texts are cut before tokenizing anyway",
    ),
    Option(
        "max_example_bytes",
        "limits",
        integer(1024),
        512 * 1024 * 1024,
        "most bytes of one tenant's stored examples (texts and encoded images)",
    ),
    Option(
        "max_image_bytes",
        "limits",
        integer(1024),
        8 * 1024 * 1024,
        "most bytes of one encoded image (a larger one gets INVALID_ARGUMENT naming it)",
    ),
    Option(
        "max_image_pixels",
        "limits",
        integer(1),
        40_000_000,
        "most pixels (width x height, read from the header before decoding) of one image",
    ),
    Option(
        "max_queue_wait_ms",
        "batching",
        number(0),
        1000.0,
        "calls that would wait longer than this for the backbone get RESOURCE_EXHAUSTED at once",
    ),
    Option(
        "max_loop_lag_ms",
        "batching",
        number(0),
        0.0,
        "while the event loop runs this far behind, new Embed and Classify calls get "
        "RESOURCE_EXHAUSTED at the door, before any work (0: never)",
    ),
    Option(
        "max_versions",
        "limits",
        integer(1),
        50,
        "head versions kept per tenant (the newest; the active one and its predecessor are always kept)",
    ),
    Option(
        "max_resident_head_bytes",
        "limits",
        integer(1024),
        512 * 1024 * 1024,
        "head weights kept in memory; past it the least recently used heads are unloaded",
    ),
    Option(
        "max_train_seconds",
        "limits",
        number(1),
        300.0,
        "longest one training may run; longer ones stop with RESOURCE_EXHAUSTED",
    ),
    Option("train_workers", "limits", integer(1), 2, "trainings that may run at once"),
    Option("max_examples", "limits", integer(2), 50_000, "most labelled examples stored per tenant"),
    Option("max_classes", "limits", integer(2), 1000, "most labels one head may have"),
    Option(
        "cache_capacity",
        "store",
        integer(0),
        200_000,
        "embeddings kept in memory by the embedding cache (LRU)",
    ),
    Option(
        "cache_scope",
        "store",
        choice("tenant", "shared"),
        "tenant",
        "tenant (default: a tenant never sees, not even as a hit count or a faster AdaptHead, what another "
        "embedded) or shared (tenants reuse each other's cached embeddings: only where all tenants are one "
        "organisation)",
    ),
    Option(
        "train_threads", None, integer(1), 1, "PyTorch threads for head training (the rest stay with serving)"
    ),
    Option("grace_seconds", None, number(0), 20.0, "on SIGTERM, how long calls in flight may take to finish"),
    Option("log_format", None, choice("text", "json"), "text", "text or json"),
    Option(
        "log_level",
        None,
        choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        "INFO",
        "DEBUG, INFO, WARNING or ERROR",
    ),
    Option(
        "home", None, path, None, "data directory for the default backbone and store", factory=default_home
    ),
    Option(
        "auth",
        "auth",
        choice("none", "keys"),
        "none",
        "none (every caller may do everything) or keys (API keys)",
        field="mode",
    ),
    Option(
        "auth_pepper",
        "auth",
        text,
        None,
        "the secret the stored key digests are keyed with (prefer the file)",
        field="pepper",
    ),
    Option("auth_pepper_file", "auth", path, None, "a file holding the auth pepper", field="pepper_file"),
    Option(
        "tls_cert",
        "tls",
        path,
        None,
        "PEM certificate chain: serve gRPC over TLS (re-read when it changes)",
        field="cert",
    ),
    Option("tls_key", "tls", path, None, "PEM private key of --tls-cert", field="key"),
    Option(
        "tls_client_ca",
        "tls",
        path,
        None,
        "PEM CA bundle: require client certificates it signed (mTLS)",
        field="client_ca",
    ),
    Option(
        "health_port",
        None,
        PORT,
        0,
        "a plaintext port with only grpc.health.v1 on it, for probes that cannot speak TLS; 0 turns it off",
    ),
)
