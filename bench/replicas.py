"""Replicas on PostgreSQL: how fast a swap reaches the others, and what the shared store costs Classify.

    python -m bench.replicas [--swaps 50] [--seconds 15] [--rounds 4] [--write-docs] [--quick]

1. Propagation: three servers on one throwaway PostgreSQL (Debian's, as the tests use). A tenant's head is
   trained on A and made resident on B and C; then A switches the active version `--swaps` times
   (ActivateHeadVersion between two versions). After each reply from A, B and C are polled every 2 ms until
   they answer with the new version; the delay from A's reply is recorded.
2. Throughput: single-text Classify, 32 callers closed loop, on one server with the PostgreSQL store and one
   with the local store, `--rounds` runs each in ABBA order; the ratio is PostgreSQL over local (target >= 0.95: the store is
   not on the serving path).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import LatencySummary, bench_parser, markdown_table, measured_on, publish
from bench.data import banking77
from bench.overload import capacity
from bench.serving import local_server

HEADING = "## Replicas on PostgreSQL"


def training_set() -> tuple[list[str], list[str]]:
    by_intent: dict[str, list[str]] = {}
    for text, intent in banking77("train"):
        by_intent.setdefault(intent, []).append(text)
    pairs = [(t, y) for i in range(20) for y in sorted(by_intent)[:6] for t in by_intent[y][i : i + 1]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def propagation(a: str, others: Sequence[str], swaps: int) -> list[float]:
    from headswap.client import Client

    texts, labels = training_set()
    delays: list[float] = []
    with Client(a) as client:
        v1 = client.adapt_head("prop", texts, labels).version
        v2 = client.adapt_head("prop", texts[:60], labels[:60], replace=True).version
        clients = [Client(t, retries=0) for t in others]
        for c in clients:
            c.classify("prop", ["card"])  # resident
        for i in range(swaps):
            target = v1 if i % 2 == 0 else v2
            client.activate_head_version("prop", target)
            sent = time.perf_counter()

            def wait(c: Client, sent: float = sent, target: int = target) -> None:
                while c.classify("prop", ["card"])[0].version != target:
                    time.sleep(0.002)
                delays.append((time.perf_counter() - sent) * 1000)

            threads = [threading.Thread(target=wait, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        for c in clients:
            c.close()
    return delays


def render(delays: list[float], throughput: dict[str, list[float]], command: str) -> str:
    lat = LatencySummary.of(delays)
    pg, local = (sum(throughput[k]) / len(throughput[k]) for k in ("postgresql", "local"))
    rows = [
        [
            "swap seen by the other replicas (ms)",
            f"{lat.p50_ms:.1f}",
            f"{lat.p99_ms:.1f}",
            f"{lat.max_ms:.1f}",
        ],
    ]
    return "\n".join(
        [
            measured_on(command),
            "",
            f"Three servers on one PostgreSQL 15 (unix socket, same machine); {len(delays)} observations "
            "(two replicas per swap), each from A's ActivateHeadVersion reply to the replica's first Classify "
            "answer with the new version (polled every 2 ms).",
            "",
            markdown_table(["", "p50", "p99", "max"], rows, [False, True, True, True]),
            "",
            "Classify throughput of one server, single text, 32 callers, closed loop, runs alternated (ABBA order):",
            "",
            markdown_table(
                ["store", "calls/s (each run)", "mean"],
                [
                    [
                        k,
                        ", ".join(f"{v:.0f}" for v in throughput[k]),
                        f"{sum(throughput[k]) / len(throughput[k]):.0f}",
                    ]
                    for k in ("local", "postgresql")
                ],
                [False, False, True],
            ),
            "",
            f"PostgreSQL / local: **{pg / local:.2f}** (target >= 0.95).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=4, help="throughput runs per store, order alternated")
    args = parser.parse_args(argv)
    if args.quick:
        args.swaps, args.seconds, args.rounds = 6, 2.0, 2
    from headswap.client import Client
    from headswap.server.testing_postgres import postgres

    flags = ("--warmup-rounds", "1", "--store-migrate", "true")
    texts = [t for t, _ in banking77("test")][:500]
    with tempfile.TemporaryDirectory(prefix="headswap-replicas-") as tmp, postgres() as pg:
        root = Path(tmp)
        dsn = pg.create_database("bench")
        with (
            local_server(args.backbone, dsn, flags, log_path=root / "a.log") as a,
            local_server(args.backbone, dsn, flags, log_path=root / "b.log") as b,
            local_server(args.backbone, dsn, flags, log_path=root / "c.log") as c,
        ):
            delays = propagation(a.target, [b.target, c.target], args.swaps)
        throughput: dict[str, list[float]] = {"local": [], "postgresql": []}
        for round_ in range(args.rounds):
            order = [("local", str(root / f"local{round_}")), ("postgresql", dsn)]
            for name, store in order if round_ % 2 == 0 else order[::-1]:  # ABBA: drift cancels out
                with local_server(args.backbone, store, flags, log_path=root / f"t-{name}{round_}.log") as s:
                    with Client(s.target) as client:
                        client.adapt_head("load", *training_set())
                    throughput[name].append(asyncio.run(capacity(s.target, "load", texts, args.seconds)))
                print(name, throughput[name][-1], flush=True)
    body = render(delays, throughput, "python -m bench.replicas" + (" --quick" if args.quick else ""))
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
