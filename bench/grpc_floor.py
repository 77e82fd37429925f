"""What a single-text Classify costs the server beside the floor of a Python gRPC server, per CPU-second.

    python -m bench.grpc_floor [--rounds 2] [--seconds 8] [--clients 1] [--write-docs]

Two servers take the same closed-loop load of single-text Classify calls (bench.load, raw requests, 64
callers per load process), in turns: `bench._echo_serve`, grpc.aio answering every call with a fixed reply
and doing nothing else, and headswap with the free encoder (`bench._free_serve`: the real server, the real
tokenizer, a forward pass that costs nothing, a trained head). Each figure is calls answered per CPU-second
of the server's processes (from /proc), so it does not depend on the share of the cores the load processes
took; the difference between the two is what headswap's own Python costs per call (interceptor, decoding,
admission, tokenizing, batching, head, reply).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench._gpu_free import with_cpu
from bench._gpu_serving import classify_saturation, server, train_tenant, wait_all_workers
from bench._gpu_workload import workloads
from bench.common import DEFAULT_BACKBONE, DOCS, machine, markdown_table, write_section
from bench.load import run_load
from bench.serving import source_version

HEADING = "## The gRPC floor: a single-text Classify's server CPU beside grpc.aio alone"


def echo_server(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._echo_serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if "SERVING" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("the echo server did not start")
    return proc


def classify_load(target: str, texts: list[str], seconds: float, clients: int) -> Any:
    return partial(run_load, classify_saturation(target, texts, seconds), clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=1, help="load processes")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    from headswap.server.testing import free_port

    texts = workloads(DEFAULT_BACKBONE / "tokenizer.json", quick=True)["short"]
    runs: dict[str, list[dict[str, Any]]] = {"grpc.aio echo": [], "headswap, free encoder": []}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            if name == "grpc.aio echo":
                port = free_port()
                proc = echo_server(port)
                try:
                    time.sleep(0.5)
                    figures = with_cpu(
                        proc.pid, classify_load(f"127.0.0.1:{port}", texts, args.seconds, args.clients)
                    )
                finally:
                    proc.kill()
                    proc.wait()
            else:
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    server(
                        DEFAULT_BACKBONE,
                        ["--precision", "fp32"],
                        module="bench._free_serve",
                        log_path=Path(tmp) / "log",
                    ) as hs,
                ):
                    wait_all_workers(hs, 1)
                    train_tenant(hs.target, "bench", 200)
                    figures = with_cpu(
                        hs.proc.pid, classify_load(hs.target, texts, args.seconds, args.clients)
                    )
            print(name, r, figures, flush=True)
            runs[name].append(figures)
    rows = []
    per_cpu = {name: float(np.median([f["calls_per_cpu_s"] for f in figs])) for name, figs in runs.items()}
    for name, figs in runs.items():
        rate = float(np.median([f["calls_per_s"] for f in figs]))
        rows.append([name, f"{rate:,.0f}", f"{per_cpu[name]:,.0f}", f"{1000 / per_cpu[name]:.2f}"])
    body = markdown_table(
        ["server", "calls/s answered", "calls per server CPU-second", "server CPU ms per call"],
        rows,
        [False, True, True, True],
    )
    floor, ours = per_cpu["grpc.aio echo"], per_cpu["headswap, free encoder"]
    body += (
        f"\n\nheadswap's own share of a call: {1000 / ours - 1000 / floor:.2f} of {1000 / ours:.2f} CPU ms "
        f"({(1 - ours / floor) * 100:.0f} %); gRPC's floor alone caps one Python process at {floor:,.0f} calls "
        "per CPU-second."
    )
    print(body)
    if args.write_docs:
        intro = (
            f"Measured with `python -m bench.grpc_floor --rounds {args.rounds} --seconds {args.seconds:g} "
            f"--clients {args.clients}` on {machine().describe()} ({source_version()}); medians of the rounds."
        )
        write_section(HEADING, intro + "\n\n" + body, DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
