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
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench._classify_report import Report, render
from bench._classify_workload import (
    Profile,
    closed_loop,
    open_loop,
    open_loop_seconds,
    profile_run,
    tenant_specs,
    train_tenants,
)
from bench.common import DEFAULT_BACKBONE, DOCS, machine, publish, wait_for_quiet
from bench.data import data_root, read_banking77
from bench.run_k6 import K6Summary, run_k6
from bench.serving import (
    batch_limits_from_log,
    local_server,
    machine_cpu_seconds,
    process_cpu_seconds,
    source_version,
)

HEADING = "## Classify latency"


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
    return publish(HEADING, body, args.write_docs, announce=True)


if __name__ == "__main__":
    sys.exit(main())
