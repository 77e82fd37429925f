"""Fairness: other tenants' Classify while one caller sends the largest Embed the limits allow.

    python -m bench.fairness [--baseline REV] [--rounds N] [--seconds S] [--rate R] [--quick] [--write-docs]

Issue 23 found one within-limits Embed (1,024 texts of 7 KB: 7.4 MB, under every limit) taking 28.7 s on 2
cores and making 556 of 574 other tenants' Classify calls RESOURCE_EXHAUSTED while it ran. For each server
(this commit, and the commit `--baseline` names, checked out into a temporary worktree: the same machine,
the same run, alternating), one server starts on the real backbone (fp32), 20 tenants train a head each,
then, for `--seconds`:

- quiet: the tenants' single-text Classify calls at `--rate` calls/s (open loop, latency from when each call
  was due, `bench/load.py`), nothing else;
- with the big Embed: the same, while one caller sends that Embed back to back.

Reported: the other tenants' answered calls/s, p50 and p99, and the share refused (RESOURCE_EXHAUSTED), and
how many texts of the big Embed were answered meanwhile (it must still get its share).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._gpu_free import baseline_tree, compatible_backbone
from bench._gpu_serving import load_summary, server
from bench._gpu_workload import Results
from bench.common import REPO, bench_parser, load_average, machine, markdown_table, write_section
from bench.data import data_root, joined_texts, read_banking77, read_sst2
from bench.load import LoadSpec, run_load
from bench.serving import source_version

HEADING = "## Fairness: one caller's largest Embed beside other tenants' Classify"
TENANTS = 20
BIG_TEXTS = 1024
BIG_TEXT_CHARS = 7000


def big_texts(count: int) -> list[str]:
    return joined_texts(read_sst2(data_root()), count, BIG_TEXT_CHARS)


def train_tenants(target: str) -> str:
    from headswap.client import Client

    rows = read_banking77(data_root())
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(text)
    labels = sorted(by_label)
    names = []
    with Client(target, timeout=600) as hs:
        for t in range(TENANTS):
            chosen = labels[(3 * t) % len(labels) : (3 * t) % len(labels) + 3]
            texts = [x for label in chosen for x in by_label[label][:8]]
            hs.adapt_head(
                f"t{t}", texts, [label for label in chosen for _ in range(8)], validation_fraction=0
            )
            names.append(f"t{t}")
    return ",".join(names)


class BigCaller:
    """One caller sending the big Embed back to back, in a thread of its own, until stopped."""

    def __init__(self, target: str, texts: list[str]) -> None:
        self.target, self.texts = target, texts
        self.answered = self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from headswap.client import Client, ResourceExhausted

        with Client(self.target, timeout=600, retries=0) as hs:
            while not self.stop.is_set():
                try:
                    hs.embed(self.texts)
                    self.answered += len(self.texts)
                except ResourceExhausted:
                    self.refused += 1
                    time.sleep(0.5)

    def __enter__(self) -> BigCaller:
        self.thread.start()
        time.sleep(2.0)  # its first call is in the queue before the others start
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


def measure(
    target: str, tenants: str, texts: list[str], big: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    spec = LoadSpec(
        target,
        "classify_rate",
        texts,
        rate=rate,
        concurrency=256,
        seconds=seconds,
        tenant=tenants,
        client="raw",
    )
    quiet = run_load(spec, 1)
    with BigCaller(target, big) as caller:
        loaded = run_load(spec, 1)
    out: dict[str, Any] = {}
    for name, result in (("quiet", quiet), ("big_embed", loaded)):
        summary = load_summary(result)
        total = result.calls + sum(result.errors.values())
        refused = result.errors.get("RESOURCE_EXHAUSTED", 0)
        summary["refused_share"] = round(refused / total, 4) if total else None
        out[name] = summary
    out["big_embed_texts_answered"] = caller.answered
    out["big_embed_refused"] = caller.refused
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--baseline", default="", help="a commit to measure beside this one")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="other tenants' Classify calls per second")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fairness.json")
    args = parser.parse_args(argv)
    seconds = 8.0 if args.quick else args.seconds
    out = Results(args.out)
    out.put("machine", machine().describe())
    out.put("source", source_version())
    texts = [t for t, _ in read_banking77(data_root(), "test")][:2000]
    big = big_texts(64 if args.quick else BIG_TEXTS)
    systems: list[tuple[str, dict[str, str], Path]] = [("this commit", {}, args.backbone)]
    with contextlib.ExitStack() as stack:
        if args.baseline:
            path = stack.enter_context(baseline_tree(args.baseline))
            env = {"PYTHONPATH": os.pathsep.join([str(path), str(REPO)])}
            old = compatible_backbone(args.backbone, path / "headswap", path.parent / "backbone")
            systems.insert(0, (f"baseline {args.baseline}", env, old))
        for r in range(args.rounds):
            for name, env, backbone in systems if r % 2 == 0 else systems[::-1]:
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    server(backbone, ["--precision", "fp32"], env=env, log_path=Path(tmp) / "log") as proc,
                ):
                    tenants = train_tenants(proc.target)
                    out.put(
                        f"{name} round {r}", measure(proc.target, tenants, texts, big, args.rate, seconds)
                    )
    out.put("load_average_end", round(load_average(), 2))
    rows = []
    for key, value in out.data.items():
        if not isinstance(value, dict) or "quiet" not in value:
            continue
        for phase in ("quiet", "big_embed"):
            v = value[phase]
            rows.append(
                [key, phase.replace("_", " "), f"{v['calls_per_s']}", f"{v['p50_ms']}", f"{v['p99_ms']}",
                 f"{100 * (v['refused_share'] or 0):.1f} %",
                 str(value["big_embed_texts_answered"]) if phase == "big_embed" else "—"]
            )  # fmt: skip
    table = markdown_table(
        [
            "server",
            "phase",
            "others' calls/s",
            "p50 ms",
            "p99 ms",
            "others refused",
            "big Embed texts answered",
        ],
        rows,
        [False, False, True, True, True, True, True],
    )
    print(table)
    if args.write_docs:
        intro = (
            f"`python -m bench.fairness` on {out.data['machine']} ({out.data['source']}); load average "
            f"{out.data['load_average_end']} at the end. {TENANTS} tenants send single-text Classify at "
            f"{args.rate:.0f} calls/s (open loop, latency from when each call was due) for {seconds:.0f} s, "
            f"quiet, then while one caller sends an Embed of {len(big)} texts of {BIG_TEXT_CHARS} characters "
            "back to back (the largest the default limits allow)."
        )
        write_section(HEADING, intro + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
