"""`bench.classify_latency`'s workload and measurements: the tenants' training sets, the open-loop schedule,
training the heads, open- and closed-loop Classify calls with the server's own timings, profiled runs."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import LatencySummary
from bench.serving import (
    BatchLogStats,
    local_server,
    open_loop_calls,
    process_cpu_seconds,
    read_lines,
    self_cpu_seconds,
    thread_cpu_seconds,
    thread_delta,
    thread_groups,
)

CALLERS = 32


# -- pure helpers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantSpec:
    name: str
    texts: list[str]
    labels: list[str]


def tenant_specs(
    rows: Sequence[tuple[str, str]],
    tenants: int,
    *,
    pool_labels: int = 24,
    per_label: int = 4,
    min_labels: int = 2,
    max_labels: int = 4,
    seed: int = 0,
) -> list[TenantSpec]:
    """`tenants` tiny training sets: each picks `min_labels`..`max_labels` intents out of a pool of
    `pool_labels` and takes the same `per_label` texts for each, so the texts repeat across tenants (the
    server then embeds each text once and serves the rest from its embedding cache). The first tenant always
    gets `max_labels` intents: it is the one the single-tenant runs use, so it should be no smaller a head
    than the others."""
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(text)
    eligible = sorted(label for label, texts in by_label.items() if len(texts) >= per_label)
    if len(eligible) < max(pool_labels, max_labels) or not 2 <= min_labels <= max_labels <= pool_labels:
        raise ValueError(
            f"need {pool_labels} intents with {per_label} texts each and 2 <= min <= max <= pool"
        )
    rng = random.Random(seed)
    pool = rng.sample(eligible, pool_labels)
    examples = {label: rng.sample(by_label[label], per_label) for label in pool}
    out = []
    for i in range(tenants):
        k = max_labels if i == 0 else rng.randint(min_labels, max_labels)
        labels = rng.sample(pool, k)
        texts = [t for label in labels for t in examples[label]]
        out.append(TenantSpec(f"bench-{i:04d}", texts, [label for label in labels for _ in range(per_label)]))
    return out


def schedule(rate: float, seconds: float) -> list[float]:
    """Start offsets (s) of an open-loop run: one call every 1/rate s for `seconds`."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    return [i / rate for i in range(round(rate * seconds))]


def open_loop_seconds(rate: float, quick: bool) -> float:
    """Long enough for a p99 that rests on at least ~10 slow calls (1,000 calls), within 20..60 s."""
    if quick:
        return 4.0
    return float(min(60.0, max(20.0, 1000.0 / rate)))


# -- measurements ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    heads: int
    seconds: float
    train_seconds: float  # server-side fit time, summed
    embedded: int  # examples embedded (cache misses)
    cache_hits: int
    concurrency: int


async def train_tenants(target: str, specs: Sequence[TenantSpec], concurrency: int) -> Training:
    from headswap.client import AsyncClient

    gate = asyncio.Semaphore(concurrency)
    results = []

    async with AsyncClient(target, timeout=120.0) as client:

        async def one(spec: TenantSpec) -> None:
            async with gate:
                # force_activate: the benchmark wants every head live, whatever 2 epochs made of it.
                results.append(
                    await client.adapt_head(
                        spec.name,
                        spec.texts,
                        spec.labels,
                        validation_fraction=0,
                        max_epochs=2,
                        force_activate=True,
                    )
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for s in specs))
        seconds = time.perf_counter() - t0
    return Training(
        heads=len(results),
        seconds=seconds,
        train_seconds=sum(r.metrics.train_seconds for r in results),
        embedded=sum(r.embedded for r in results),
        cache_hits=sum(r.cache_hits for r in results),
        concurrency=concurrency,
    )


@dataclass(frozen=True)
class ServerTimings:
    """Means over calls of the replies' timings (ms)."""

    queue_ms: float
    preprocess_ms: float
    backbone_ms: float
    head_ms: float
    total_ms: float

    @classmethod
    def of(cls, replies: Sequence[object]) -> ServerTimings:
        t = [r.timings for r in replies]  # type: ignore[attr-defined]
        return cls(
            queue_ms=float(np.mean([x.queue_us for x in t])) / 1000,
            preprocess_ms=float(np.mean([x.preprocess_us for x in t])) / 1000,
            backbone_ms=float(np.mean([x.backbone_us for x in t])) / 1000,
            head_ms=float(np.mean([x.head_us for x in t])) / 1000,
            total_ms=float(np.mean([x.total_us for x in t])) / 1000,
        )


@dataclass(frozen=True)
class OpenLoop:
    rate: float
    seconds: float
    sent: int
    errors: int
    latency: LatencySummary  # from the scheduled start
    max_send_lag_ms: float  # how late the client started a call, at worst
    server: ServerTimings
    server_cpu_s: float


def _classify_request(tenant: str, text: str) -> object:
    from headswap.v1 import headswap_pb2 as pb

    return pb.ClassifyRequest(tenant=tenant, inputs=[pb.Input(text=text)], top_k=1)


async def open_loop(
    target: str, pid: int, tenant_for: Callable[[int], str], texts: Sequence[str], rate: float, seconds: float
) -> OpenLoop:
    import grpc
    from grpc import aio

    from headswap.v1 import headswap_pb2_grpc as pb_grpc

    offsets = schedule(rate, seconds)
    latencies: list[float] = []
    replies: list[object] = []
    errors = 0
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        await stub.Classify(_classify_request(tenant_for(0), texts[0]), timeout=30)  # connect first

        async def call(i: int, due: float) -> None:
            nonlocal errors
            try:
                reply = await stub.Classify(
                    _classify_request(tenant_for(i), texts[i % len(texts)]), timeout=30
                )
            except grpc.RpcError:
                errors += 1
                return
            latencies.append((time.perf_counter() - due) * 1000)
            replies.append(reply)

        cpu0 = process_cpu_seconds(pid)
        lag = await open_loop_calls(offsets, call)
        server_cpu = process_cpu_seconds(pid) - cpu0
    if not latencies:
        raise RuntimeError(f"every call failed at {rate} calls/s")
    return OpenLoop(
        rate=rate,
        seconds=seconds,
        sent=len(offsets),
        errors=errors,
        latency=LatencySummary.of(latencies),
        max_send_lag_ms=lag * 1000,
        server=ServerTimings.of(replies),
        server_cpu_s=server_cpu,
    )


@dataclass(frozen=True)
class Throughput:
    mode: str  # "single" or "mixed"
    calls: int
    seconds: float
    latency: LatencySummary
    server: ServerTimings
    server_cpu_s: float
    client_cpu_s: float

    @property
    def rate(self) -> float:
        """Calls answered per second of the run."""
        return self.calls / self.seconds


async def closed_loop(
    target: str,
    pid: int,
    mode: str,
    tenant_for: Callable[[int], str],
    texts: Sequence[str],
    seconds: float,
    callers: int = CALLERS,
) -> Throughput:
    from grpc import aio

    from headswap.v1 import headswap_pb2_grpc as pb_grpc

    latencies: list[float] = []
    replies: list[object] = []
    counter = 0
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        await stub.Classify(_classify_request(tenant_for(0), texts[0]), timeout=30)
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal counter
            while time.perf_counter() < stop_at:
                i = counter
                counter += 1
                t0 = time.perf_counter()
                reply = await stub.Classify(
                    _classify_request(tenant_for(i), texts[i % len(texts)]), timeout=30
                )
                latencies.append((time.perf_counter() - t0) * 1000)
                replies.append(reply)

        cpu0, client0 = process_cpu_seconds(pid), self_cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - t0
        server_cpu, client_cpu = process_cpu_seconds(pid) - cpu0, self_cpu_seconds() - client0
    return Throughput(
        mode,
        len(latencies),
        elapsed,
        LatencySummary.of(latencies),
        ServerTimings.of(replies),
        server_cpu,
        client_cpu,
    )


@dataclass(frozen=True)
class Profile:
    """One run under `bench._named_serve`: server CPU per call by job, and the forward passes."""

    label: str
    load: str  # "25 calls/s open loop" or "closed loop, 32 callers"
    calls_per_s: float
    latency: LatencySummary
    cpu_ms_per_call: dict[str, float]  # by THREAD_GROUPS job
    batches: BatchLogStats | None


def profile_run(
    backbone: Path,
    store: Path,
    flags: Sequence[str],
    tmp: Path,
    label: str,
    env: dict[str, str],
    rate: float | None,
    seconds: float,
    tenant: str,
    texts: Sequence[str],
) -> Profile:
    """A server on the same store (heads load from it on first use), named threads, forward passes logged;
    open loop at `rate`, or closed loop with `CALLERS` callers when `rate` is None."""
    batch_log = tmp / f"batches-{len(list(tmp.iterdir()))}.log"
    with local_server(
        backbone,
        store,
        flags,
        log_path=tmp / f"server-{label.replace(' ', '_')}.log",
        module="bench._named_serve",
        env={"HEADSWAP_BENCH_BATCH_LOG": str(batch_log), **env},
    ) as server:
        asyncio.run(closed_loop(server.target, server.pid, "single", lambda i: tenant, texts, 2.0))
        logged = len(read_lines(batch_log))
        before = thread_cpu_seconds(server.pid)
        t0 = time.perf_counter()
        if rate is None:
            closed = asyncio.run(
                closed_loop(server.target, server.pid, "single", lambda i: tenant, texts, seconds)
            )
            load, calls, achieved, latency = (
                f"closed loop, {CALLERS} callers",
                closed.calls,
                closed.rate,
                closed.latency,
            )
        else:
            opened = asyncio.run(open_loop(server.target, server.pid, lambda i: tenant, texts, rate, seconds))
            load, calls, achieved, latency = f"{rate:g} calls/s open loop", opened.sent, rate, opened.latency
        wall = time.perf_counter() - t0
        groups = thread_groups(thread_delta(before, thread_cpu_seconds(server.pid)))
    return Profile(
        label,
        load,
        achieved,
        latency,
        {k: 1000 * v / calls for k, v in groups.items()},
        BatchLogStats.parse(read_lines(batch_log)[logged:], wall),
    )
