"""Shared pieces of the benchmarks: where things are, statistics, the machine, the docs file; the data sets
and workloads are in bench/data.py, the server under test in bench/serving.py.

Unit-tested, as are the data and workloads (tests/unit/test_bench_common.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "BENCHMARKS.md"
DEFAULT_BACKBONE = REPO / ".cache" / "backbone"
# Throughput benches drive the server at saturation in a closed loop (32 callers with up to 64 long texts
# each: tens of seconds of queued work on 2 cores). Admission control would refuse most of that at its
# default 1 s bound; the peers have none, so the servers of these benches get a bound they never reach.
SATURATION_FLAGS = ("--max-queue-wait-ms", "600000")

# -- statistics --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> LatencySummary:
        return cls(
            count=len(values_ms),
            mean_ms=sum(values_ms) / len(values_ms),
            p50_ms=percentile(values_ms, 50),
            p90_ms=percentile(values_ms, 90),
            p99_ms=percentile(values_ms, 99),
            max_ms=max(values_ms),
        )


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


# -- the machine -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    cpus: int
    cpu_model: str
    ram_gib: float
    accelerator: str
    date_utc: str

    def describe(self) -> str:
        return (
            f"{self.cpus} CPU cores ({self.cpu_model}), {self.ram_gib:.0f} GiB RAM, {self.accelerator}; "
            f"measured {self.date_utc} UTC"
        )


def machine(accelerator: str = "no GPU") -> Machine:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    model = "unknown CPU"
    ram = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024**2
                break
    except OSError:
        pass
    return Machine(cpus, model, ram, accelerator, dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"))


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(
    threshold: float = 0.7,
    poll_s: float = 30.0,
    max_wait_s: float = 600.0,
    *,
    read: Callable[[], float] = load_average,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> float:
    """Wait (up to `max_wait_s`) until the 1-minute load average is at most `threshold`; returns the load
    average read last, which is the one the measurement starts at and the one the docs record.

    The machine is shared: measuring while other work runs would charge its CPU time to whichever system
    happened to run then. After `max_wait_s` it measures anyway and the recorded load says so."""
    waited = 0.0
    load = read()
    while load > threshold and waited < max_wait_s:
        say(f"load average {load:.2f} > {threshold}: waiting {poll_s:.0f}s ({waited:.0f}s so far)")
        sleep(poll_s)
        waited += poll_s
        load = read()
    if load > threshold:
        say(f"warning: load average still {load:.2f} after {waited:.0f}s; measuring anyway")
    return load


# -- the server --------------------------------------------------------------------------------------------
# -- the docs file -----------------------------------------------------------------------------------------


def _is_fence(line: str) -> bool:
    return line.lstrip().startswith(("```", "~~~"))


def replace_section(document: str, heading: str, body: str) -> str:
    """`document` with the section under `heading` (up to the next `## ` heading) replaced by `body`.

    Other sections are kept byte for byte, since other people write them. A missing section is appended.
    Lines inside fenced code blocks never count as headings (a shell comment would otherwise end one)."""
    section = heading + "\n\n" + body.strip("\n") + "\n"
    lines = document.splitlines(keepends=True)
    start = end = None
    in_fence = False
    for i, line in enumerate(lines):
        if _is_fence(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and line.startswith("## "):
            end = i
            break
    if start is None:
        if not document.strip():
            return "# Benchmarks\n\n" + section
        return document.rstrip("\n") + "\n\n" + section
    before = "".join(lines[:start])
    if end is None:
        return before + section
    return before + section + "\n" + "".join(lines[end:])


def bench_parser(doc: str | None, quick: str = "short runs, to check the script") -> argparse.ArgumentParser:
    """The arguments every server benchmark takes: --backbone, --quick and --write-docs; each adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    return parser


def write_section(heading: str, body: str, path: Path = DOCS) -> None:
    """Read, replace, write at once: others edit the same file, so the read is as late as possible."""
    document = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(document, heading, body), encoding="utf-8")


def sh_block(command: str) -> list[str]:
    """A command to reproduce a section, as the lines of a fenced `sh` block."""
    return ["```sh", command, "```"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A pipe table; numeric columns are right-aligned."""
    if len(headers) != len(numeric) or any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("--:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def publish(heading: str, body: str, write_docs: bool, *, announce: bool = False) -> int:
    """The end of a benchmark's main: with --write-docs, its section written into docs/BENCHMARKS.md (and,
    with `announce`, a line saying so). Returns 0, the exit status."""
    if write_docs:
        write_section(heading, body)
        if announce:
            print(f"wrote {heading!r} in {DOCS}")
    return 0


def measured_on(command: str) -> str:
    """A section's first line: the command, the machine, and the load average at the end."""
    return f"`{command}` on {machine().describe()}; load average {load_average():.2f} at the end."
