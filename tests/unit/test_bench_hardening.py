"""The pure parts of bench/soak.py and bench/overload.py."""

from __future__ import annotations

import os

import pytest

from bench.common import LatencySummary
from bench.overload import Outcome
from bench.soak import Samples, process_sample, slope


def test_slope_is_least_squares() -> None:
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([0, 10, 20], [5, 5, 5]) == 0.0
    assert slope([1], [4]) == 0.0
    s = Samples([0, 5, 10, 15, 20, 25], [100, 200, 300, 300, 301, 302], [9, 9, 9, 9, 9, 9], [3] * 6)
    late = s.second_half()
    assert late.t == [15, 20, 25]
    rss, fds, threads = late.slopes_per_10min()
    assert rss == pytest.approx(600 * 0.2) and fds == 0 and threads == 0


def test_process_sample_reads_this_process() -> None:
    rss, fds, threads = process_sample(os.getpid())
    assert rss > 10 and fds >= 3 and threads >= 1


def test_overload_outcome_row() -> None:
    lat = LatencySummary.of([1.0, 2.0, 3.0])
    o = Outcome("on", 100.0, 300.0, 10.0, {"OK": 900, "RESOURCE_EXHAUSTED": 2100}, lat, lat, 4.0)
    assert o.goodput == 90.0
    row = o.row()
    assert row[3:6] == ["90", "0.90", "70.0 %"] and row[7] == "2.0 / 3.0"


def test_cache_entry_bytes_counts_the_vector_and_its_bookkeeping() -> None:
    from bench.soak import cache_entry_bytes

    per_entry = cache_entry_bytes(n=2_000)
    assert 384 * 4 < per_entry < 4 * 384 * 4  # the float32 vector, plus key, owners and dict overhead
