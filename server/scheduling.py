"""`--cpu-policy`: the Linux scheduling policy of the server's threads.

`normal` (the default) leaves them as started. `batch` puts every thread of the process, and so every thread
and worker process it starts later, under SCHED_BATCH: a thread that wakes up (gRPC's poller, the backbone's
thread, another worker's) no longer preempts one that is running. Each worker's event loop holds its
process's GIL while it runs; preempted, it holds it still, and its whole process waits. With several workers
on few cores that was most of what a worker beyond the first cost: measured with the free encoder on 2 cores
and h2load, 2 workers carried about a fifth more single-text Classify calls a second under `batch`
(docs/BENCHMARKS.md, "The pipeline's ceiling"). The price is in the tail: a woken thread may wait for the
running one's time slice; at 1,000 calls/s, a rate both policies carried, p99 was 7-12 ms against 7-9 over two
runs (at 1,500 only `batch` came near). No privilege is needed (it only gives up wake-up preemption); the kernel has it
since Linux 2.6.16, other systems do not. Default `normal`: measured on CPUs only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CHOICES = ("normal", "batch")


def apply(policy: str) -> int:
    """Put this process's threads under `policy`; returns how many threads were set (0 for `normal`).
    A thread made later inherits its maker's policy, a process its parent's."""
    if policy == "normal":
        return 0
    if policy != "batch":
        raise ValueError(f"--cpu-policy must be one of {', '.join(CHOICES)}, not {policy!r}")
    set_policy = getattr(os, "sched_setscheduler", None)
    batch = getattr(os, "SCHED_BATCH", None)
    if set_policy is None or batch is None:
        raise ValueError("--cpu-policy batch needs Linux (SCHED_BATCH); use --cpu-policy normal here")
    done = 0
    for task in _threads():
        try:
            set_policy(task, batch, os.sched_param(0))
            done += 1
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return done


def applied(policy: str) -> bool:
    """`apply`, at a server's start: False (and why, logged) where the policy cannot be had."""
    try:
        apply(policy)
    except (ValueError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        return False
    return True


def current(thread: int = 0) -> str:
    """The policy of a thread of this process (0: the calling one), as `--cpu-policy` names it."""
    get_policy = getattr(os, "sched_getscheduler", None)
    if get_policy is None:
        return "normal"
    return "batch" if get_policy(thread) == getattr(os, "SCHED_BATCH", -1) else "normal"


def _threads() -> list[int]:
    tasks = Path("/proc/self/task")
    return [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]


__all__ = ["CHOICES", "applied", "apply", "current"]
