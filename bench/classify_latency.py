"""Classify latency and mixed-tenant throughput of a headswap server.

    python -m bench.classify_latency [--quick] [--write-docs] [--profile] [--rates 25,50,100,200] [--tenants 1000]

One server (its own process, defaults unless `--server-flags`), then:

1. Training: `--tenants` tiny heads (2 to 4 banking77 intents x 4 examples each, `validation_fraction=0`,
   `max_epochs=2`), drawn from a small pool of texts so that after the first few heads every example is an
   embedding-cache hit; timed.
2. Latency, open loop: single-text Classify calls to one tenant started on a fixed schedule (`--rates` calls
   per second) whatever the replies do; latency runs from the scheduled start, so a server (or client) that
   falls behind shows up in the percentiles instead of silently lowering the rate.
3. Throughput, closed loop: 32 callers each send single-text Classify calls back to back, all to one tenant
   (single) or each call to a tenant drawn at random from all of them (mixed); two rounds each, alternated.
4. k6 (bench/k6/classify.js, k6's gRPC module): constant-arrival-rate single-text Classify, single and mixed.

The calls of 2 and 3 go through the generated grpc.aio stub (what `AsyncClient` wraps) so that the replies'
server-side timings can be read.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import (
    DEFAULT_BACKBONE,
    DOCS,
    THREAD_GROUPS,
    BatchLogStats,
    LatencySummary,
    Machine,
    batch_limits_from_log,
    data_root,
    local_server,
    machine,
    machine_cpu_seconds,
    markdown_table,
    process_cpu_seconds,
    ratio,
    read_banking77,
    read_lines,
    self_cpu_seconds,
    source_version,
    thread_cpu_seconds,
    thread_delta,
    thread_groups,
    wait_for_quiet,
    write_section,
)
from bench.run_k6 import K6Summary, run_k6

HEADING = "## Classify latency"
CALLERS = 32
GPU_RATE = 2000  # calls/s of the GPU targets (p50 <= 2 ms, p99 <= 10 ms), not reachable on this CPU


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
    lag = 0.0
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

        tasks = []
        cpu0 = process_cpu_seconds(pid)
        start = time.perf_counter() + 0.05
        for i, offset in enumerate(offsets):
            due = start + offset
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            lag = max(lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(call(i, due)))
        await asyncio.gather(*tasks)
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


# -- report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    machine: Machine
    load_average: float
    flags: str
    training: Training
    open_loops: list[OpenLoop]
    throughput: list[Throughput]
    k6: list[tuple[str, int, str, K6Summary]]  # (mode, rate, duration, summary)
    command: str
    tenants: int
    profile: list[Profile] = field(default_factory=list)
    limits: tuple[int, int] | None = None
    source: str = ""
    others: tuple[float, float] = (0.0, 0.0)  # other work's CPU and steal during the measurements, in cores


def _mean_rate(runs: Sequence[Throughput], mode: str) -> float:
    rates = [t.rate for t in runs if t.mode == mode]
    return float(np.mean(rates)) if rates else float("nan")


def findings(report: Report) -> list[str]:
    """What the numbers say, computed from them (so a rerun cannot leave a stale sentence behind)."""
    out = []
    if report.open_loops:
        queues = [o.server.queue_ms for o in report.open_loops]
        out.append(
            f"- A call that arrives alone still waits out the batcher's window for company: the mean queue "
            f"time is {min(queues):.1f}–{max(queues):.1f} ms at every open-loop rate, i.e. the whole "
            "`--batch-max-wait-ms` (2 ms by default): the batcher waits for company even when no batch is "
            "running. On a GPU that window alone would use up the p50 ≤ 2 ms budget."
        )
    if report.throughput:
        gaps = [
            t.server.total_ms
            - (t.server.queue_ms + t.server.preprocess_ms + t.server.backbone_ms + t.server.head_ms)
            for t in report.throughput
        ]
        totals = [t.server.total_ms for t in report.throughput]
        out.append(
            f"- Under load the reply's `timings` miss part of the time: in the closed-loop runs "
            f"{min(gaps):.0f}–{max(gaps):.0f} ms of a call's {min(totals):.0f}–{max(totals):.0f} ms server "
            "total are in none of queue / preprocess / backbone / head (the batcher hands a second batch to "
            "the single backbone thread while the first still runs, and that wait is counted nowhere)."
        )
    if len(report.profile) >= 2:
        shipped, what_if = report.profile[0], report.profile[1]
        a, b = sum(shipped.cpu_ms_per_call.values()), sum(what_if.cpu_ms_per_call.values())
        out.append(
            f"- At {shipped.calls_per_s:g} calls/s the server burns {a:.1f} CPU ms per call, "
            f"{shipped.cpu_ms_per_call['forward pass']:.1f} of them in the forward-pass threads although the "
            f"backbone computes only {100 * (shipped.batches.busy_share if shipped.batches else 0):.0f}% of "
            "the time: ONNX Runtime's intra-op pool spins between passes. With "
            f"`allow_spinning=0` it is {b:.1f} CPU ms per call (p50 {shipped.latency.p50_ms:.1f} → "
            f"{what_if.latency.p50_ms:.1f} ms, p99 {shipped.latency.p99_ms:.1f} → "
            f"{what_if.latency.p99_ms:.1f} ms): spinning buys a little latency with a core that callers "
            "and neighbours on the same machine could use."
        )
    closed = [p for p in report.profile if p.load.startswith("closed")]
    if closed:
        loop_ms = closed[0].cpu_ms_per_call["event loop"]
        out.append(
            f"- The server's one event loop (gRPC handlers, interceptor and access log, batcher) spends "
            f"{loop_ms:.2f} CPU ms per single-text call under load on this CPU, so it alone can carry at most "
            f"~{1000 / loop_ms:,.0f} calls/s here, whatever runs the forward pass: the {GPU_RATE:,} calls/s "
            "GPU target needs a faster host CPU or less Python per call."
        )
    single, mixed = _mean_rate(report.throughput, "single"), _mean_rate(report.throughput, "mixed")
    if not math.isnan(ratio(mixed, single)):
        out.append(
            f"- {report.tenants:,} tenants cost nothing measurable against one: mixed / single = "
            f"{ratio(mixed, single):.2f}; the grouped head step is "
            f"{max(t.server.head_ms for t in report.throughput):.2f} ms per call at most."
            if ratio(mixed, single) >= 0.9
            else f"- Mixed / single = {ratio(mixed, single):.2f}: serving {report.tenants:,} tenants costs "
            "throughput."
        )
    return out


def render(report: Report) -> str:
    lines: list[str] = []
    lines.append(
        "Single-text `Classify` over gRPC against a server on the same 2 CPU cores as its callers. **No GPU "
        "here: absolute figures only count from a GPU.** The GPU targets (p50 ≤ 2 ms and p99 ≤ 10 ms at "
        f"{GPU_RATE:,} calls/s) were not measured, because this task has no GPU; on this CPU one forward "
        "pass of a single short text already takes several milliseconds, so the rates below are scaled to "
        "what 2 cores can serve. The CPU-checkable target is the mixed/single throughput ratio (≥ 0.9)."
    )
    lines.append("")
    lines.append(
        "Latency, open loop (calls started on a fixed schedule whatever the replies do; latency from the "
        "scheduled start; one tenant; server-side means from the replies' `timings`):"
    )
    lines.append("")
    rows = []
    for o in report.open_loops:
        rows.append(
            [
                f"{o.rate:g}",
                f"{o.seconds:.0f}",
                f"{o.sent:,}",
                str(o.errors),
                f"{o.latency.p50_ms:.1f}",
                f"{o.latency.p90_ms:.1f}",
                f"{o.latency.p99_ms:.1f}",
                f"{o.latency.max_ms:.1f}",
                f"{o.server.queue_ms:.1f} / {o.server.preprocess_ms:.1f} / {o.server.backbone_ms:.1f} / "
                f"{o.server.head_ms:.2f} / {o.server.total_ms:.1f}",
                f"{100 * o.server_cpu_s / o.seconds:.0f}%",
            ]
        )
    lines.append(
        markdown_table(
            [
                "calls/s",
                "s",
                "calls",
                "errors",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "server queue / preprocess / backbone / head / total ms",
                "server CPU (of 1 core)",
            ],
            rows,
            [True, True, True, True, True, True, True, True, False, True],
        )
    )
    lines.append("")
    single, mixed = _mean_rate(report.throughput, "single"), _mean_rate(report.throughput, "mixed")
    r = ratio(mixed, single)
    lines.append(
        f"Throughput, closed loop ({CALLERS} callers, single-text calls back to back), one tenant against "
        f"{report.tenants:,} tenants (each call to a random one); rounds alternated:"
    )
    lines.append("")
    trows = []
    for t in report.throughput:
        trows.append(
            [
                t.mode,
                f"{t.calls:,}",
                f"{t.seconds:.1f}",
                f"{t.rate:,.1f}",
                f"{t.latency.p50_ms:.1f}",
                f"{t.latency.p99_ms:.1f}",
                f"{t.server.queue_ms:.1f} / {t.server.backbone_ms:.1f} / {t.server.head_ms:.2f}",
                f"{1000 * t.server_cpu_s / t.calls:.2f}",
                f"{1000 * t.client_cpu_s / t.calls:.2f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "tenants",
                "calls",
                "s",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "server queue / backbone / head ms",
                "server CPU ms/call",
                "client CPU ms/call",
            ],
            trows,
            [False, True, True, True, True, True, False, True, True],
        )
    )
    lines.append("")
    lines.append(
        f"Mixed / single: {mixed:,.1f} / {single:,.1f} calls/s = **{r:.2f}** (target ≥ 0.9: "
        f"{'met' if r >= 0.9 else 'missed'})."
    )
    lines.append("")
    found = findings(report)
    if found:
        lines += [*found, ""]
    if report.k6:
        lines.append(
            "k6 (`bench/k6/classify.js`, `k6/net/grpc`, constant-arrival-rate executor, one connection per VU; "
            "`grpc_req_duration` from k6's `--summary-export`):"
        )
        lines.append("")
        krows = []
        for mode, rate, duration, s in report.k6:
            krows.append(
                [
                    mode,
                    str(rate),
                    duration,
                    f"{s.iterations:,}",
                    f"{s.iterations_per_s:.1f}",
                    f"{s.p50_ms:.1f}",
                    f"{s.p90_ms:.1f}",
                    f"{s.p95_ms:.1f}",
                    f"{s.p99_ms:.1f}",
                    f"{s.max_ms:.1f}",
                    f"{s.checks_failed} of {s.checks_passed + s.checks_failed}",
                    str(s.dropped_iterations),
                ]
            )
        lines.append(
            markdown_table(
                [
                    "tenants",
                    "rate/s",
                    "duration",
                    "iterations",
                    "iterations/s",
                    "p50 ms",
                    "p90 ms",
                    "p95 ms",
                    "p99 ms",
                    "max ms",
                    "failed checks",
                    "dropped",
                ],
                krows,
                [False, True, False, True, True, True, True, True, True, True, False, True],
            )
        )
        lines.append("")
    if report.profile:
        lines.append(
            "Profile (separate servers on the same store under `bench/_named_serve.py`, which names the "
            "server's threads by job and logs every forward pass): the lowest open-loop rate as shipped and as a "
            "what-if with ONNX Runtime's `session.intra_op.allow_spinning=0` (which `headswap serve` does not "
            "set today), and the closed loop as shipped. Server CPU ms per call by job:"
        )
        lines.append("")
        prows = []
        for p in report.profile:
            busy = f"{100 * p.batches.busy_share:.0f}%" if p.batches else "–"
            prows.append(
                [
                    p.label,
                    p.load,
                    f"{p.calls_per_s:.0f}",
                    f"{p.latency.p50_ms:.1f}",
                    f"{p.latency.p99_ms:.1f}",
                    *(f"{v:.2f}" for v in p.cpu_ms_per_call.values()),
                    f"{sum(p.cpu_ms_per_call.values()):.2f}",
                    busy,
                ]
            )
        groups = [*(n for n, _ in THREAD_GROUPS), "other"]
        lines.append(
            markdown_table(
                [
                    "server",
                    "load",
                    "calls/s",
                    "p50 ms",
                    "p99 ms",
                    *(f"{g} CPU" for g in groups),
                    "all CPU",
                    "backbone busy",
                ],
                prows,
                [False, False, True, True, True, *([True] * len(groups)), True, True],
            )
        )
        lines.append("")
    tr = report.training
    lines.append(
        f"Training the {tr.heads:,} heads (2–4 banking77 intents × 4 examples, `validation_fraction=0`, "
        f"`max_epochs=2`, {tr.concurrency} `AdaptHead` calls in flight): {tr.seconds:.1f} s in all, "
        f"{1000 * tr.seconds / tr.heads:.0f} ms per head end to end, of which {1000 * tr.train_seconds / tr.heads:.0f} ms "
        f"fitting (server's `train_seconds`); {tr.embedded:,} examples embedded, {tr.cache_hits:,} "
        "embedding-cache hits."
    )
    lines.append("")
    lines.append("Reproduce (starts and stops its own server; waits for a quiet machine first):")
    lines.append("")
    lines.append("```sh")
    lines.append(report.command)
    lines.append("```")
    lines.append("")
    lines.append(
        f"Machine: {report.machine.describe()}; 1-minute load average {report.load_average:.2f} when the run "
        "started (read before its own work; it waits while the load is above 0.7). Server flags: "
        f"{('`' + report.flags + '`') if report.flags else 'defaults'}"
        + (
            f" (batches of at most {report.limits[0]} inputs and {report.limits[1]} padded tokens, as the "
            "server logged them)"
            if report.limits
            else ""
        )
        + f"; {report.source or 'unknown commit'}. While the server was measured, other processes used "
        f"{100 * report.others[0]:.0f}% of one core and the hypervisor stole {100 * report.others[1]:.0f}% "
        "(from /proc/stat, less the server's, this benchmark's and k6's own CPU)."
    )
    lines.append("")
    lines.append(
        "Texts: banking77 test-set questions (short, one per call), the same sequence for every run. The "
        "benchmark's own client, k6 and the server share the 2 cores."
    )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def _own_cpu_with_children() -> float:
    """This process and its waited-for children (k6) together."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs and 50 tenants (a smoke run)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the section {HEADING!r} of {DOCS}")
    parser.add_argument("--rates", default=None, help="open-loop calls/s, comma-separated (25,50,100,200)")
    parser.add_argument("--tenants", type=int, default=None, help="tenants for the mixed runs (1000)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per throughput round (15)")
    parser.add_argument("--k6-rate", type=int, default=100, help="k6 constant arrival rate, calls/s")
    parser.add_argument("--k6-duration", default=None, help="k6 run length (30s)")
    parser.add_argument("--no-k6", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the lowest rate (named threads, ORT spinning what-if)",
    )
    parser.add_argument("--server-flags", default="", help="extra `headswap serve` flags")
    parser.add_argument("--train-concurrency", type=int, default=4)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--no-wait", action="store_true", help="skip waiting for a quiet machine")
    args = parser.parse_args(argv)
    # About a tenth to two thirds of what 2 cores serve (~300 single-text calls/s closed loop): the knee of
    # the latency curve shows without running the queue over.
    rates = [float(r) for r in (args.rates or ("20,100" if args.quick else "25,50,100,200")).split(",")]
    tenants = args.tenants or (50 if args.quick else 1000)
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    k6_duration = args.k6_duration or ("5s" if args.quick else "30s")

    # First thing, before this run's own work (training the heads) raises the load average it is meant to judge.
    load = wait_for_quiet(max_wait_s=0 if args.no_wait else 600)
    print(f"load average {load:.2f}")
    root = data_root()
    specs = tenant_specs(read_banking77(root, "train"), tenants)
    queries = [t for t, _ in read_banking77(root, "test")]
    random.Random(0).shuffle(queries)
    names = [s.name for s in specs]
    pick = random.Random(1)
    # Drawn up front, so that both modes run the same code path per call (a list lookup).
    mixed_order = [names[pick.randrange(len(names))] for _ in range(1 << 16)]

    def single_tenant(i: int) -> str:
        return names[0]

    def mixed_tenant(i: int) -> str:
        return mixed_order[i % len(mixed_order)]

    with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
        flags = shlex.split(args.server_flags)
        with local_server(
            args.backbone, Path(tmp) / "store", flags, log_path=Path(tmp) / "server.log"
        ) as server:
            limits = batch_limits_from_log(server.log_path.read_text(errors="replace"))
            print(f"server pid {server.pid} on {server.target}, flags {flags or 'defaults'}: {limits}")
            training = asyncio.run(train_tenants(server.target, specs, args.train_concurrency))
            print(
                f"trained {training.heads} heads in {training.seconds:.1f}s "
                f"({1000 * training.seconds / training.heads:.0f} ms each; fit {training.train_seconds:.1f}s; "
                f"embedded {training.embedded}, cache hits {training.cache_hits})"
            )
            # Warm-up: both modes, so every head's slot and the batcher's shapes are hot.
            asyncio.run(closed_loop(server.target, server.pid, "single", single_tenant, queries, 2.0))
            asyncio.run(closed_loop(server.target, server.pid, "mixed", mixed_tenant, queries, 2.0))
            print(f"load average {os.getloadavg()[0]:.2f} after training (this run's own load)")
            # Whatever else runs on the machine from here on shows up as CPU nobody of ours used.
            ours0 = process_cpu_seconds(server.pid) + _own_cpu_with_children()
            busy0, steal0 = machine_cpu_seconds()
            started = time.perf_counter()

            open_loops = []
            for rate in rates:
                o = asyncio.run(
                    open_loop(
                        server.target,
                        server.pid,
                        single_tenant,
                        queries,
                        rate,
                        open_loop_seconds(rate, args.quick),
                    )
                )
                print(
                    f"  open loop {rate:g}/s: p50 {o.latency.p50_ms:.1f} ms, p99 {o.latency.p99_ms:.1f} ms, "
                    f"max {o.latency.max_ms:.1f} ms, errors {o.errors}, send lag {o.max_send_lag_ms:.1f} ms, "
                    f"server {o.server}"
                )
                open_loops.append(o)

            throughput = []
            for _ in range(2):
                for mode, tenant_for in (("single", single_tenant), ("mixed", mixed_tenant)):
                    t = asyncio.run(
                        closed_loop(server.target, server.pid, mode, tenant_for, queries, seconds)
                    )
                    print(
                        f"  closed loop {mode}: {t.rate:.1f} calls/s, p50 {t.latency.p50_ms:.1f} ms, "
                        f"p99 {t.latency.p99_ms:.1f} ms, server {t.server}"
                    )
                    throughput.append(t)

            k6_runs: list[tuple[str, int, str, K6Summary]] = []
            if not args.no_k6:
                for mode, chosen in (("single", names[:1]), ("mixed", names)):
                    summary, _ = run_k6(
                        server.target, queries[:2000], chosen, rate=args.k6_rate, duration=k6_duration
                    )
                    print(f"  k6 {mode} at {args.k6_rate}/s: {summary}")
                    k6_runs.append((mode, args.k6_rate, k6_duration, summary))
            busy, steal = machine_cpu_seconds()
            ours = process_cpu_seconds(server.pid) + _own_cpu_with_children() - ours0
            elapsed = time.perf_counter() - started
            others = (max(0.0, busy - busy0 - ours) / elapsed, (steal - steal0) / elapsed)
            print(f"others' CPU {100 * others[0]:.0f}% of a core, steal {100 * others[1]:.0f}%")

        profiles: list[Profile] = []
        if args.profile:  # after the measured server has stopped: one server at a time
            low = open_loop_seconds(rates[0], args.quick) / 2
            runs: list[tuple[str, dict[str, str], float | None, float]] = [
                ("as shipped", {}, rates[0], low),
                ("what-if: allow_spinning=0", {"HEADSWAP_BENCH_ORT_SPINNING": "0"}, rates[0], low),
                ("as shipped", {}, None, seconds / 2),  # None: closed loop
            ]
            for label, env, profile_rate, run_seconds in runs:
                p = profile_run(
                    args.backbone,
                    Path(tmp) / "store",
                    flags,
                    Path(tmp),
                    label,
                    env,
                    profile_rate,
                    run_seconds,
                    names[0],
                    queries,
                )
                print(f"  profile {label}: {p}")
                profiles.append(p)

    command = "python -m bench.classify_latency" + (" --quick" if args.quick else "")
    command += f" --server-flags {shlex.quote(args.server_flags)}" if args.server_flags else ""
    command += f" --rates {args.rates}" if args.rates else ""
    command += f" --tenants {args.tenants}" if args.tenants else ""
    command += f" --k6-rate {args.k6_rate}" if args.k6_rate != 100 else ""
    command += " --profile" if args.profile else ""
    command += " --write-docs" if args.write_docs else ""
    report = Report(
        machine(),
        load,
        args.server_flags,
        training,
        open_loops,
        throughput,
        k6_runs,
        command,
        tenants,
        profiles,
        limits,
        source_version(),
        others,
    )
    body = render(report)
    print()
    print(body)
    if args.write_docs:
        write_section(HEADING, body)
        print(f"wrote {HEADING!r} in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
