"""Soak: minutes of mixed Embed, Classify, AdaptHead and DeleteHead across 1,000 tenants; is memory flat?

    python -m bench.soak [--seconds 600] [--tenants 1000] [--samples FILE.json] [--write-docs] [--quick]

One server (its own process, local store, defaults). First every tenant gets a small head (2 to 4
Banking77 intents, 3 examples each). Then 16 workers send, for `--seconds`, a mix: 60 % single-text
Classify (a random tenant), 20 % Embed (1 to 8 texts), 12 % AdaptHead (2 new examples, of labels the
tenant already has, added to a random tenant), 5 % DeleteHead followed by a retraining under the same name
(new labels), 3 % calls for unknown tenants (which must not leave anything behind). So the heads keep their
widths and what the server holds by design stays about the same size: growth is what a leak would show.

Every 5 s the server's RSS, open file descriptors and threads are sampled, with two of its gauges that hold
memory by design (the embedding cache's entries and the bytes of the head stacks); the slope of each over
the second half of the run is reported, with the file-backed part of RSS (library code paged in), and what
of the RSS slope none of those accounts for; a run of 30 minutes or more also reports them window by window
(10 minutes each), to show whether growth levels off.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench._soak_report import render
from bench._soak_samples import (
    CACHE_ENTRIES,
    HEADS_ALLOCATED,
    Samples,
    cache_entry_bytes,
    process_sample,
    scrape,
)
from bench.common import bench_parser, write_section
from bench.data import banking77
from bench.serving import local_server

HEADING = "## Soak: mixed load across 1,000 tenants"
MIX = (("classify", 60), ("embed", 20), ("adapt", 12), ("delete", 5), ("unknown", 3))


async def run(
    target: str, pid: int, metrics_port: int, tenants: int, seconds: float, seed: int = 0
) -> tuple[Counter[str], Samples, float]:
    from headswap.client import AsyncClient, HeadswapError

    by_intent: dict[str, list[str]] = {}
    for text, intent in banking77("train"):
        by_intent.setdefault(intent, []).append(text)
    intents = sorted(by_intent)
    names = [f"soak-{i:04d}" for i in range(tenants)]

    labels_of: dict[str, list[str]] = {}

    def examples(r: random.Random, name: str, per: int = 3) -> tuple[list[str], list[str]]:
        chosen = labels_of[name] = r.sample(intents, r.randint(2, 4))
        pairs = [(t, y) for y in chosen for t in r.sample(by_intent[y], per)]
        return [t for t, _ in pairs], [y for _, y in pairs]

    def more_examples(r: random.Random, name: str) -> tuple[list[str], list[str]]:
        """Two new examples of labels the tenant has: its head keeps its width."""
        ys = [r.choice(labels_of[name]) for _ in range(2)]
        return [r.choice(by_intent[y]) for y in ys], ys

    outcomes: Counter[str] = Counter()
    samples = Samples([], [], [], [])
    async with AsyncClient(target, timeout=60) as client:
        setup = time.perf_counter()
        gate = asyncio.Semaphore(8)

        async def create(name: str) -> None:
            async with gate:
                await client.adapt_head(
                    name, *examples(random.Random(name), name), validation_fraction=0, force_activate=True
                )

        await asyncio.gather(*(create(n) for n in names))
        setup_s = time.perf_counter() - setup
        ops = [op for op, weight in MIX for _ in range(weight)]
        end = time.perf_counter() + seconds

        async def one(op: str, r: random.Random) -> None:
            name = r.choice(names)
            if op == "classify":
                await client.classify(name, [r.choice(by_intent[r.choice(intents)])])
            elif op == "embed":
                await client.embed([r.choice(by_intent[r.choice(intents)]) for _ in range(r.randint(1, 8))])
            elif op == "adapt":
                await client.adapt_head(
                    name, *more_examples(r, name), validation_fraction=0, force_activate=True
                )
            elif op == "delete":
                await client.delete_head(name)
                await client.adapt_head(name, *examples(r, name), validation_fraction=0, force_activate=True)
            else:
                ghost = f"ghost-{r.getrandbits(48):012x}"
                for call in (
                    client.classify(ghost, ["x"]),
                    client.delete_head(ghost),
                    client.activate_head_version(ghost, 1),
                ):
                    try:
                        await call
                    except HeadswapError as exc:
                        outcomes[f"unknown {exc.code.name}"] += 1

        async def worker(i: int) -> None:
            r = random.Random(seed * 1000 + i)
            while time.perf_counter() < end:
                op = r.choice(ops)
                try:
                    await one(op, r)
                    if op != "unknown":  # those count their own refusals
                        outcomes[f"{op} OK"] += 1
                except HeadswapError as exc:
                    outcomes[f"{op} {exc.code.name}"] += 1

        async def sampler() -> None:
            start = time.perf_counter()
            while time.perf_counter() < end:
                rss, fds, threads, file_mib = process_sample(pid)
                held = await asyncio.to_thread(scrape, metrics_port)
                samples.t.append(time.perf_counter() - start)
                samples.rss_mib.append(rss)
                samples.fds.append(fds)
                samples.threads.append(threads)
                samples.cache_entries.append(held[CACHE_ENTRIES])
                samples.heads_mib.append(held[HEADS_ALLOCATED] / 2**20)
                samples.file_mib.append(file_mib)
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(worker(i) for i in range(16)))
    return outcomes, samples, setup_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, "30 s and 50 tenants, to check the script")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument(
        "--samples", type=Path, help="also write every sample here (JSON), to plot or re-read"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.tenants = 30.0, 50
    from headswap.server.testing import free_port

    metrics_port = free_port()
    with tempfile.TemporaryDirectory(prefix="headswap-soak-") as tmp:
        with local_server(
            args.backbone,
            Path(tmp) / "store",
            (),
            log_path=Path(tmp) / "server.log",
            metrics_port=metrics_port,
        ) as server:
            outcomes, samples, setup_s = asyncio.run(
                run(server.target, server.pid, metrics_port, args.tenants, args.seconds)
            )
            log = server.log()
    if args.samples:
        args.samples.write_text(json.dumps(asdict(samples)))
    command = "python -m bench.soak" + (" --quick" if args.quick else "")
    if not args.quick and args.seconds != 600:
        command += f" --seconds {args.seconds:.0f}"
    body = render(outcomes, samples, args.seconds, args.tenants, setup_s, command, cache_entry_bytes())
    print(body)
    internal = [k for k in outcomes if "INTERNAL" in k or "UNKNOWN" in k]
    if internal or "Traceback" in log:
        print(f"FAILED: {internal}\n{log[-3000:]}")
        return 1
    if args.write_docs:  # the 10-minute run the issue asked for, and longer ones in a section each
        write_section(HEADING if args.seconds == 600 else f"{HEADING}, {args.seconds / 60:.0f} minutes", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
