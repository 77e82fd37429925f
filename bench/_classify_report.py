"""`bench.classify_latency`'s report: what the numbers say (computed from them) and the markdown section."""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench._classify_workload import CALLERS, OpenLoop, Profile, Throughput, Training
from bench.common import Machine, markdown_table, ratio
from bench.run_k6 import K6Summary
from bench.serving import THREAD_GROUPS


def batch_window_ms(flags: str) -> float:
    """The batcher's window (`--batch-max-wait-ms`) of a server started with `flags`, read as the server reads
    its settings (flags, then HEADSWAP_* variables, then the declared default)."""
    from headswap.server.config import ServerConfig

    parser = argparse.ArgumentParser(add_help=False)
    ServerConfig.add_arguments(parser)
    args, _ = parser.parse_known_args(shlex.split(flags))
    return float(ServerConfig.from_sources(args).batching.max_wait_ms)


GPU_RATE = 2000  # calls/s of the GPU targets (p50 <= 2 ms, p99 <= 10 ms), not reachable on this CPU


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
        window = batch_window_ms(report.flags)
        span = f"{min(queues):.1f}–{max(queues):.1f} ms"
        out.append(
            f"- A call that arrives alone waits out the batcher's window for company: the mean queue time is "
            f"{span} at every open-loop rate, about the whole `--batch-max-wait-ms` ({window:g} ms here) even "
            "when no batch is running. On a GPU that window alone would use up the p50 ≤ 2 ms budget."
            if min(queues) >= 0.8 * window
            else f"- A call that arrives alone does not wait for company: the mean queue time is {span} at the "
            f"open-loop rates, against a `--batch-max-wait-ms` window of {window:g} ms, so an idle backbone "
            "takes a lone call at once (the queue time is the hand-offs between threads)."
        )
    if report.throughput:
        gaps = [
            t.server.total_ms
            - (t.server.queue_ms + t.server.preprocess_ms + t.server.backbone_ms + t.server.head_ms)
            for t in report.throughput
        ]
        totals = [t.server.total_ms for t in report.throughput]
        if max(gaps) >= 1.0:
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
            f"{ratio(mixed, single):.2f}; the grouped head stage is at most "
            f"{max(t.server.head_ms for t in report.throughput):.2f} ms of a call's server time."
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
