"""Overload: open-loop Classify at 3x the server's capacity, with admission control and without it.

    python -m bench.overload [--quick] [--write-docs] [--factor 3] [--seconds 20] [--baseline REV]

For each configuration (the defaults, and the same server with `--max-queue-wait-ms` so large that only
the item bound is left, as before admission control) one server is started, one tenant trained, then:
1. capacity: 32 callers send single-text Classify calls back to back for a while; calls per second;
2. overload: calls are started on a fixed schedule at `--factor` x that capacity, each with a 5 s deadline,
   whatever the replies do. Goodput (OK calls per second) is compared with capacity, and every refusal's
   latency (from its scheduled start) is recorded: a refusal must come in milliseconds, not at the deadline.

With `--baseline REV` the defaults of commit REV are measured too, in the same run (first), for a before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._gpu_free import baseline_tree, compatible_backbone
from bench.common import REPO, LatencySummary, bench_parser, markdown_table, measured_on, publish
from bench.data import banking77
from bench.serving import local_server, open_loop_calls

HEADING = "## Overload: admission control"
DEADLINE_S = 5.0
ADMISSION_OFF = ("--max-queue-wait-ms", "100000000")


@dataclass(frozen=True)
class Outcome:
    config: str
    capacity: float  # calls/s, closed loop
    rate: float  # offered, calls/s
    seconds: float
    codes: dict[str, int]
    ok_latency: LatencySummary | None
    refused_latency: LatencySummary | None
    max_send_lag_ms: float

    @property
    def goodput(self) -> float:
        return self.codes.get("OK", 0) / self.seconds

    def row(self) -> list[str]:
        sent = sum(self.codes.values())

        def share(code: str) -> str:
            return f"{100 * self.codes.get(code, 0) / sent:.1f} %"

        def p(lat: LatencySummary | None, q: str) -> str:
            return f"{getattr(lat, q):.1f}" if lat else "-"

        return [
            self.config,
            f"{self.capacity:.0f}",
            f"{self.rate:.0f}",
            f"{self.goodput:.0f}",
            f"{self.goodput / self.capacity:.2f}",
            share("RESOURCE_EXHAUSTED"),
            share("DEADLINE_EXCEEDED"),
            p(self.refused_latency, "p50_ms") + " / " + p(self.refused_latency, "p99_ms"),
            p(self.ok_latency, "p50_ms") + " / " + p(self.ok_latency, "p99_ms"),
            f"{self.max_send_lag_ms:.0f}",
        ]


async def capacity(
    target: str,
    tenant: str,
    texts: Sequence[str],
    seconds: float,
    callers: int = 32,
    api_key: str | None = None,
) -> float:
    from headswap.client import AsyncClient

    done = 0
    end = time.perf_counter() + seconds
    async with AsyncClient(target, retries=0, timeout=30, api_key=api_key) as client:

        async def caller(i: int) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await client.classify(tenant, [texts[(i * 7919 + done) % len(texts)]])
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        return done / (time.perf_counter() - started)


async def overload(
    target: str, tenant: str, texts: Sequence[str], rate: float, seconds: float
) -> tuple[Counter[str], list[float], list[float], float]:
    import grpc
    from grpc import aio

    from headswap.v1 import headswap_pb2 as pb
    from headswap.v1 import headswap_pb2_grpc as pb_grpc

    codes: Counter[str] = Counter()
    ok_ms: list[float] = []
    refused_ms: list[float] = []
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)

        async def call(i: int, due: float) -> None:
            request = pb.ClassifyRequest(tenant=tenant, inputs=[pb.Input(text=texts[i % len(texts)])])
            try:
                await stub.Classify(request, timeout=DEADLINE_S)
                codes["OK"] += 1
                ok_ms.append((time.perf_counter() - due) * 1000)
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused_ms.append((time.perf_counter() - due) * 1000)

        lag = await open_loop_calls([i / rate for i in range(int(rate * seconds))], call)
    return codes, ok_ms, refused_ms, lag * 1000


async def measure(
    config: str,
    flags: Sequence[str],
    args: argparse.Namespace,
    texts: Sequence[str],
    tmp: Path,
    backbone: Path,
    env: dict[str, str],
) -> Outcome:
    from headswap.client import AsyncClient

    name = config.replace(" ", "-").replace(",", "")
    log = tmp / f"server-{name}.log"
    with local_server(backbone, tmp / f"store-{name}", flags, log_path=log, env=env) as server:
        async with AsyncClient(server.target, timeout=120) as client:
            intents = sorted({y for _, y in banking77("train")})[:10]
            pairs = [(t, y) for t, y in banking77("train") if y in intents]
            await client.adapt_head("load", [t for t, _ in pairs[:200]], [y for _, y in pairs[:200]])
        cap = await capacity(server.target, "load", texts, args.capacity_seconds)
        rate = cap * args.factor
        codes, ok_ms, refused_ms, lag = await overload(server.target, "load", texts, rate, args.seconds)
    return Outcome(
        config,
        cap,
        rate,
        args.seconds,
        dict(codes),
        LatencySummary.of(ok_ms) if ok_ms else None,
        LatencySummary.of(refused_ms) if refused_ms else None,
        lag,
    )


def render(outcomes: Sequence[Outcome], command: str) -> str:
    headers = [
        "server",
        "capacity (calls/s)",
        "offered",
        "goodput",
        "goodput / capacity",
        "refused",
        "deadline exceeded",
        "refusal p50 / p99 (ms)",
        "OK p50 / p99 (ms)",
        "client send lag, max (ms)",
    ]
    table = markdown_table(headers, [o.row() for o in outcomes], [False] + [True] * 9)
    return "\n".join(
        [
            measured_on(command),
            "",
            f"Single-text Classify to one tenant, open loop at {outcomes[0].rate / outcomes[0].capacity:.0f}x the "
            f"capacity measured just before (32 callers, closed loop), each call with a {DEADLINE_S:.0f} s "
            "deadline. 'admission off' is the same server with `--max-queue-wait-ms 100000000`: only the item "
            "bound of the queue is left, as before admission control.",
            "",
            table,
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, "short runs, to check the script")
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--baseline", default="", help="a commit whose defaults to measure beside")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.capacity_seconds = 3.0, 2.0
    texts = [t for t, _ in banking77("test")][:500]
    outcomes = []
    configs: list[tuple[str, Sequence[str], Path, dict[str, str]]] = [
        ("admission on (defaults)", (), args.backbone, {}),
        ("admission off", ADMISSION_OFF, args.backbone, {}),
    ]
    with tempfile.TemporaryDirectory(prefix="headswap-overload-") as tmp, contextlib.ExitStack() as stack:
        if args.baseline:
            path = stack.enter_context(baseline_tree(args.baseline))
            env = {"PYTHONPATH": os.pathsep.join([str(path), str(REPO)])}
            old = compatible_backbone(args.backbone, path / "headswap", path.parent / "backbone")
            configs.insert(0, (f"admission on (defaults), {args.baseline}", (), old, env))
        for config, flags, backbone, env in configs:
            outcome = asyncio.run(measure(config, flags, args, texts, Path(tmp), backbone, env))
            print(config, outcome.row(), flush=True)
            outcomes.append(outcome)
    command = "python -m bench.overload" + (" --quick" if args.quick else "")
    body = render(outcomes, command + (f" --baseline {args.baseline}" if args.baseline else ""))
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
