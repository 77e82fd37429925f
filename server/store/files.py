"""Writing files so that a crash leaves the old bytes or the new, never a mix; sequence numbers by clock."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from headswap.server.errors import DiskFull

P = ParamSpec("P")
R = TypeVar("R")
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def disk_full_is_exhaustion(what: str) -> Iterator[None]:
    """A write that finds the disk (or the quota) full is the domain's DiskFull (RESOURCE_EXHAUSTED), not an
    OSError that would reach the caller as INTERNAL. Every write is atomic, so the store is as it was."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL:
            raise DiskFull(what) from exc
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old bytes or the new, never a mix.

    The directory must exist: this never creates one (FileNotFoundError). A write that created its parents
    would bring back a tenant deleted while it was on its way; whoever writes creates what it means to."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def compact_json_bytes(value: Any) -> bytes:
    """For large files nobody reads by eye (a tenant's examples): a third of the time to write as indented."""
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


EXAMPLES_REF = re.compile(r"(|[0-9a-f]{64})")


def next_seq(previous: int) -> int:
    """Sequence numbers from the clock, so that they keep growing across a delete and a restart."""
    return max(time.time_ns(), previous + 1)


def holds_data(tenant_dir: Path) -> bool:
    """Whether a tenant directory holds a version or an example set (a cache or temporary files are not data)."""
    return (
        any(tenant_dir.glob("versions/*/head.json"))
        or any(tenant_dir.glob("examples/*.json"))
        or (tenant_dir / "examples.json").exists()  # the layout before content-addressing
    )


def exclusive(method: Callable[P, R]) -> Callable[P, R]:
    """A write of the store: one at a time across this process's threads and, when shared, the server's
    other processes (store/processes.py)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._writing(), disk_full_is_exhaustion(method.__name__.replace("_", " ")):  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


def recorded_last_version(raw_state: dict[str, Any]) -> int:
    """The highest version number state.json records as given out (0 when it predates the record)."""
    try:
        return int(raw_state.get("last_version", 0))
    except (TypeError, ValueError):
        return 0
