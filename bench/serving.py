"""The server under test: started on a free port, the CPU it and its threads take (/proc), what its log
says about its batches, the commit it runs, and calls on an open-loop schedule."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import REPO

if TYPE_CHECKING:
    from headswap.server.testing import ServerProcess


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
