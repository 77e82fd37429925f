"""Prometheus metrics, served on their own HTTP port at /metrics.

Every name starts with `headswap_` and carries its unit; every label set is fixed and bounded: `rpc` is one of
the server's methods, `code` a gRPC status name, `stage` and `outcome` small enums. Tenants never appear as a
label: they show only as the aggregate `headswap_tenants` and `headswap_heads_resident`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from headswap.server.inference.forward import BatchStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TRAINING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STAGES = ("queue", "tokenize", "backbone", "head")
# "replayed": a retry (the same request_id) answered with the first call's outcome, nothing trained again.
TRAINING_OUTCOMES = ("activated", "negative_transfer", "worse_than_active", "failed", "cancelled", "replayed")
AUTH_FAILURES = ("missing", "malformed", "unknown", "revoked", "expired")
PRECISIONS = ("fp32", "fp16", "int8")
TRAINED_PRECISIONS = (*PRECISIONS, "unrecorded")  # "unrecorded": a head stored before precisions were


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "headswap_requests_total",
            "gRPC calls finished, by method and status code",
            ["rpc", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "headswap_request_duration_seconds",
            "time from a call's arrival to its reply, by method",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "headswap_stage_duration_seconds",
            "time an Embed or Classify call spent in each stage: waiting in the queue, tokenizing, in the "
            "backbone, applying heads",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._stages = tuple(
            self.stage_duration.labels(stage) for stage in ("queue", "tokenize", "backbone", "head")
        )
        self._calls: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.batch_size = Histogram(
            "headswap_batch_size_items", "inputs per backbone forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_padding = Histogram(
            "headswap_batch_padding_ratio",
            "share of a forward pass's tokens that are padding",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "headswap_batch_requests", "calls sharing one forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("headswap_queue_depth_items", "inputs waiting for the backbone", registry=r)
        self.loop_lag = Gauge(
            "headswap_event_loop_lag_seconds",
            "how far behind the event loop runs what is due (calls are shed past --max-loop-lag-ms)",
            registry=r,
        )
        self.calls_in_flight = Gauge(
            "headswap_calls_in_flight",
            "calls of the headswap service being handled (on SIGTERM it falls to 0 as the server drains)",
            registry=r,
        )
        self.cache_hits = Counter(
            "headswap_embedding_cache_hits_total",
            "training examples found in the embedding cache",
            registry=r,
        )
        self.cache_misses = Counter(
            "headswap_embedding_cache_misses_total", "training examples the backbone had to embed", registry=r
        )
        self.training_runs = Counter(
            "headswap_training_runs_total", "AdaptHead trainings, by outcome", ["outcome"], registry=r
        )
        self.training_duration = Histogram(
            "headswap_training_duration_seconds",
            "wall time of an AdaptHead training, embedding included",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.swaps = Counter("headswap_head_swaps_total", "active head versions swapped in", registry=r)
        self.heads_resident = Gauge("headswap_heads_resident", "head versions held in memory", registry=r)
        self.heads_resident_bytes = Gauge(
            "headswap_heads_resident_bytes", "bytes of head weights held in memory", registry=r
        )
        self.heads_allocated_bytes = Gauge(
            "headswap_heads_allocated_bytes",
            "bytes the head stacks hold: resident heads and the rows kept free for the next ones",
            registry=r,
        )
        self.cache_entries = Gauge(
            "headswap_embedding_cache_entries", "training embeddings held in the embedding cache", registry=r
        )
        self.tenants = Gauge("headswap_tenants", "tenants with at least one stored head", registry=r)
        self.tenants_quarantined = Gauge(
            "headswap_tenants_quarantined",
            "tenants whose stored data is damaged (answering DATA_LOSS until repaired or deleted)",
            registry=r,
        )
        self.auth_failures = Counter(
            "headswap_auth_failures_total",
            "calls refused for their credentials, by reason (never the key or its id)",
            ["reason"],
            registry=r,
        )
        self.store_disk_full = Counter(
            "headswap_store_disk_full_total",
            "writes refused because the store's disk was full (answered RESOURCE_EXHAUSTED, nothing changed)",
            registry=r,
        )
        self.cache_damaged = Counter(
            "headswap_embedding_cache_damaged_total",
            "stored cached embeddings found damaged (rows failing their checksum; a file that does not parse "
            "counts once): dropped and embedded again",
            registry=r,
        )
        self.cache_write_errors = Counter(
            "headswap_embedding_cache_write_errors_total",
            "embedding cache saves that failed (the training went on without them)",
            registry=r,
        )
        self.backbone_info = Gauge(
            "headswap_backbone_info",
            "a backbone being served (value 1), one series per backbone",
            ["served_as", "name", "fingerprint", "provider", "precision"],
            registry=r,
        )
        self.cross_precision = Counter(
            "headswap_cross_precision_predictions_total",
            "Classify predictions by a head trained on embeddings of another precision than the one that served "
            "them (same backbone weights), by the precision it was trained on and the one served",
            ["trained", "served"],
            registry=r,
        )
        # Label values known in advance are created at 0, so that rates and alerts work before the first event.
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for outcome in TRAINING_OUTCOMES:
            self.training_runs.labels(outcome)
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason)
        for trained in TRAINED_PRECISIONS:
            for served in PRECISIONS:
                if trained != served:
                    self.cross_precision.labels(trained, served)
        self._http: Any = None

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.items)
        self.batch_requests.observe(stats.requests)
        if stats.padded_cost:
            self.batch_padding.observe(1.0 - stats.real_cost / stats.padded_cost)

    def observe_stages(
        self, queue_s: float, preprocess_s: float, backbone_s: float, head_s: float | None
    ) -> None:
        queue, tokenize, backbone, head = self._stages
        queue.observe(queue_s)
        tokenize.observe(preprocess_s)
        backbone.observe(backbone_s)
        if head_s is not None:
            head.observe(head_s)

    def call_done(self, rpc: str, code: str, seconds: float) -> None:
        """One finished call, counted and timed. The labelled children are looked up once per (rpc, code):
        `labels()` takes a lock and validates its arguments, on every call of a busy server."""
        children = self._calls.get((rpc, code))
        if children is None:
            children = self._calls[(rpc, code)] = (
                self.requests.labels(rpc, code),
                self.request_duration.labels(rpc),
            )
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Let a gauge read its value when scraped (no bookkeeping on the hot path)."""

        def safe() -> float:
            try:
                return float(fn())
            except Exception:  # a scrape must never fail because a component is not up yet
                return 0.0

        gauge.set_function(safe)

    def serve(self, port: int, host: str = "") -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        addr = host.strip("[]") if host not in ("[::]", "::", "0.0.0.0") else "::"
        server, thread = start_http_server(port, addr=addr or "::", registry=self.registry)
        self._http = (server, thread)
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host or "*", bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            server, _thread = self._http
            threading.Thread(target=server.shutdown, daemon=True).start()
            self._http = None
