"""Every setting of `headswap serve` as one `Option`: its flag, its environment variable, its help, the
`ServerConfig` field it sets and an explicit parser that checks the value and names the setting in its
error. `config.py` holds the frozen sections these fill; this module holds only the table and its parsers.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        "auto (fp16 on CUDA, fp32 on CPUs: the model's own numbers), fp32, fp16 or int8 (faster on CPUs, "
        "embeddings about 0.5% off fp32's; README: Precision); a head trained on any precision of the same "
        "backbone weights is served",
    ),
    Option(
        "strict_precision",
        None,
        "strict_precision",
        boolean,
        "refuse (FAILED_PRECONDITION) a head trained on embeddings of another fingerprint than the one served "
        "(int8 has its own; fp32 and fp16 share one); off (default): served, and counted in "
        "headswap_cross_precision_predictions_total",
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
        "shape_buckets",
        "batching",
        "shape_buckets",
        choice("auto", "on", "off"),
        "pad every forward pass to one of a few fixed (rows, length) shapes, all run at warm-up: auto (on for "
        "CUDA, whose first run of a new shape costs 10-40 ms; off on a CPU, where padding is pure cost), on, off",
    ),
    Option(
        "max_queue_items",
        "batching",
        "max_queue_items",
        integer(1),
        "inputs waiting for the backbone; past it calls get RESOURCE_EXHAUSTED",
    ),
    Option(
        "workers",
        None,
        "workers",
        integer(0),
        "server processes sharing the gRPC port (SO_REUSEPORT), each with its own backbone session and event "
        "loop; 0 = by machine: 1 without a GPU, 4 with one (what it takes to keep an H200 busy)",
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
        "max_loop_lag_ms",
        "batching",
        "max_loop_lag_ms",
        number(0),
        "while the event loop runs this far behind, new Embed and Classify calls get "
        "RESOURCE_EXHAUSTED at the door, before any work (0: never)",
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
        "cache_scope",
        "store",
        "cache_scope",
        choice("tenant", "shared"),
        "tenant (default: a tenant never sees, not even as a hit count or a faster AdaptHead, what another "
        "embedded) or shared (tenants reuse each other's cached embeddings: only where all tenants are one "
        "organisation)",
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
