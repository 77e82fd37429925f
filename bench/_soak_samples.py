"""`bench.soak`'s samples: the server process's memory, descriptors and threads (/proc), its gauges
(/metrics), and their trend over a run (least-squares slopes, and what the growth is made of)."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple


def slope(times: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of values over times (units per second)."""
    n = len(times)
    if n < 2:
        return 0.0
    mt, mv = sum(times) / n, sum(values) / n
    den = sum((t - mt) ** 2 for t in times)
    return sum((t - mt) * (v - mv) for t, v in zip(times, values, strict=True)) / den if den else 0.0


def slope_error(times: Sequence[float], values: Sequence[float]) -> float:
    """Standard error of `slope` (units per second), from the residuals of the fit. Samples taken seconds
    apart are correlated, so this understates the real uncertainty: a floor for "within noise"."""
    n = len(times)
    if n < 3:
        return 0.0
    mt, mv = sum(times) / n, sum(values) / n
    den = sum((t - mt) ** 2 for t in times)
    if not den:
        return 0.0
    b = slope(times, values)
    residual = sum((v - mv - b * (t - mt)) ** 2 for t, v in zip(times, values, strict=True))
    return float((residual / (n - 2) / den) ** 0.5)


class ProcessSample(NamedTuple):
    rss_mib: float
    fds: int
    threads: int
    file_mib: float  # the part of RSS that is file-backed pages: code of the libraries, mapped files


def process_sample(pid: int) -> ProcessSample:
    """RSS, open file descriptors and threads of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssFile", "Threads"):
            fields[name] = int(value.split()[0])
    return ProcessSample(
        fields["VmRSS"] / 1024,
        len(list(Path(f"/proc/{pid}/fd").iterdir())),
        fields["Threads"],
        fields.get("RssFile", 0) / 1024,
    )


def cache_entry_bytes(n: int = 10_000, dim: int = 384) -> float:
    """Bytes one entry of the server's embedding cache takes, measured here with tracemalloc: `n` vectors
    put as AdaptHead puts them (rows of a small embedded chunk, a 32-byte key, one owning tenant)."""
    import tracemalloc

    import numpy as np

    from headswap.server.cache import EmbeddingCache

    cache = EmbeddingCache(capacity=n)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(0, n, 2):
        chunk = rng.standard_normal((2, dim), dtype=np.float32)
        cache.put_many("f" * 12, {rng.bytes(32): chunk[0], rng.bytes(32): chunk[1]}, f"soak-{i % 1000:04d}")
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / len(cache)


def gauges(text: str, names: Sequence[str]) -> dict[str, float]:
    """Unlabelled series of a Prometheus exposition, by name (0 for those absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values and not sample.labels:
                values[sample.name] = sample.value
    return values


RACES = (
    "Refusals for known tenants are the workers' own races, answered as they should be: a call that lands "
    "between a tenant's DeleteHead and its retraining finds no head (Classify NOT_FOUND) or, for AdaptHead, "
    "adds its 2 examples to none and is refused when both have one label (INVALID_ARGUMENT); two "
    "workers that delete the same tenant at once leave one NOT_FOUND."
)
CACHE_ENTRIES = "headswap_embedding_cache_entries"
HEADS_ALLOCATED = "headswap_heads_allocated_bytes"


def scrape(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return gauges(reply.read().decode(), (CACHE_ENTRIES, HEADS_ALLOCATED))


@dataclass(frozen=True)
class Samples:
    t: list[float]
    rss_mib: list[float]
    fds: list[int]
    threads: list[int]
    cache_entries: list[float] = field(default_factory=list)
    heads_mib: list[float] = field(default_factory=list)  # the head stacks, free rows included
    file_mib: list[float] = field(default_factory=list)  # file-backed pages of RSS

    def second_half(self) -> Samples:
        return self.between(self.t[len(self.t) // 2] if self.t else 0.0, float("inf"))

    def between(self, start: float, stop: float) -> Samples:
        """The samples taken at `start` or later and before `stop` (seconds into the load)."""
        keep = [i for i, t in enumerate(self.t) if start <= t < stop]
        return Samples(**{name: [v[i] for i in keep] if v else [] for name, v in asdict(self).items()})

    def slopes_per_10min(self) -> tuple[float, float, float]:
        return tuple(600 * slope(self.t, v) for v in (self.rss_mib, self.fds, self.threads))  # type: ignore[return-value]

    def attribution(self, entry_bytes: float) -> Attribution:
        """Where RSS went, per 10 minutes."""
        new_entries = 600 * slope(self.t, self.cache_entries)
        return Attribution(
            600 * slope(self.t, self.rss_mib),
            600 * slope(self.t, self.file_mib) if self.file_mib else 0.0,
            new_entries,
            new_entries * entry_bytes / 2**20,
            600 * slope(self.t, self.heads_mib),
        )


class Attribution(NamedTuple):
    """Slopes per 10 minutes: RSS and its file-backed part (MiB), the cache's new entries and their MiB, the
    head stacks (MiB); what none of them accounts for is anonymous memory held by nothing the server counts."""

    rss: float
    file: float
    new_entries: float
    cache: float
    heads: float

    @property
    def unaccounted(self) -> float:
        return self.rss - self.file - self.cache - self.heads
