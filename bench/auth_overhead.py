"""What API keys cost: Classify throughput with `--auth keys` against `--auth none`, side by side.

    python -m bench.auth_overhead [--seconds 15] [--rounds 2] [--write-docs] [--quick]

Two servers on the same backbone, one with keys (a tenant key on every call: parse, a cached record, one
HMAC-SHA256, a constant-time compare) and one without; single-text Classify, 32 callers, closed loop, the
runs alternated `--rounds` times. Target: keys / none >= 0.97.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import bench_parser, markdown_table, measured_on, publish
from bench.data import banking77
from bench.overload import capacity
from bench.replicas import training_set
from bench.serving import local_server

HEADING = "## API keys: what authentication costs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    from headswap.client import Client

    texts = [t for t, _ in banking77("test")][:500]
    results: dict[str, list[float]] = {"none": [], "keys": []}
    with tempfile.TemporaryDirectory(prefix="headswap-auth-") as tmp:
        root = Path(tmp)
        env = {"HEADSWAP_AUTH_PEPPER": "a pepper for the benchmark, long enough"}
        made = subprocess.run(
            [sys.executable, "-m", "headswap.client.cli", "keys", "create", "--admin", "--store", str(root / "keys")],
            capture_output=True, text=True, env={**os.environ, **env}, check=True,
        )  # fmt: skip
        admin = made.stdout.strip().splitlines()[-1]
        for round_ in range(args.rounds):
            for mode in ("none", "keys"):
                store = root / "keys" if mode == "keys" else root / f"plain{round_}"
                flags = ("--auth", mode, "--warmup-rounds", "1")
                with local_server(
                    args.backbone, store, flags, log_path=root / f"{mode}{round_}.log", env=env
                ) as server:
                    with Client(server.target, api_key=admin if mode == "keys" else None) as client:
                        client.adapt_head("load", *training_set())
                        key = client.create_api_key("tenant", "load").key if mode == "keys" else None
                    results[mode].append(
                        asyncio.run(capacity(server.target, "load", texts, args.seconds, api_key=key))
                    )
                print(mode, f"{results[mode][-1]:.0f} calls/s", flush=True)
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    rows = [[k, ", ".join(f"{x:.0f}" for x in results[k]), f"{mean[k]:.0f}"] for k in ("none", "keys")]
    command = "python -m bench.auth_overhead" + (" --quick" if args.quick else "")
    body = "\n".join(
        [
            measured_on(command),
            "",
            "Single-text Classify, 32 callers, closed loop, one server per run, runs alternated:",
            "",
            markdown_table(["--auth", "calls/s (each run)", "mean"], rows, [False, False, True]),
            "",
            f"keys / none: **{mean['keys'] / mean['none']:.2f}** (target >= 0.97).",
            "",
        ]
    )
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
