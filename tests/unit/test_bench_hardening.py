"""The pure parts of bench/soak.py (its samples and report) and bench/overload.py."""

from __future__ import annotations

import os

import pytest

from bench._soak_report import SHORT, render
from bench._soak_samples import RACES, Samples, gauges, process_sample, slope, slope_error
from bench.common import LatencySummary
from bench.overload import Outcome


def test_slope_is_least_squares() -> None:
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([0, 10, 20], [5, 5, 5]) == 0.0
    assert slope([1], [4]) == 0.0
    assert slope_error([0, 1, 2, 3], [1, 3, 5, 7]) == 0.0  # on the line
    # Residuals +1, -1, -1, +1 around slope 0: sqrt(4 / 2 / 5).
    assert slope_error([0, 1, 2, 3], [1, -1, -1, 1]) == pytest.approx((4 / 2 / 5) ** 0.5)
    assert slope_error([0, 1], [0, 5]) == 0.0
    s = Samples([0, 5, 10, 15, 20, 25], [100, 200, 300, 300, 301, 302], [9, 9, 9, 9, 9, 9], [3] * 6)
    late = s.second_half()
    assert late.t == [15, 20, 25]
    rss, fds, threads = late.slopes_per_10min()
    assert rss == pytest.approx(600 * 0.2) and fds == 0 and threads == 0


def test_process_sample_reads_this_process() -> None:
    rss, fds, threads, file_mib = process_sample(os.getpid())
    assert rss > 10 and fds >= 3 and threads >= 1
    assert 1 < file_mib < rss  # the interpreter's own code is file-backed; numpy's arrays are not


def test_overload_outcome_row() -> None:
    lat = LatencySummary.of([1.0, 2.0, 3.0])
    o = Outcome("on", 100.0, 300.0, 10.0, {"OK": 900, "RESOURCE_EXHAUSTED": 2100}, lat, lat, 4.0)
    assert o.goodput == 90.0
    row = o.row()
    assert row[3:6] == ["90", "0.90", "70.0 %"] and row[7] == "2.0 / 3.0"


def test_cache_entry_bytes_counts_the_vector_and_its_bookkeeping() -> None:
    from bench._soak_samples import cache_entry_bytes

    per_entry = cache_entry_bytes(n=2_000)
    assert 384 * 4 < per_entry < 4 * 384 * 4  # the float32 vector, plus key, owners and dict overhead


def test_gauges_reads_unlabelled_series_and_zero_for_absent_ones() -> None:
    text = (
        "# HELP headswap_embedding_cache_entries x\n# TYPE headswap_embedding_cache_entries gauge\n"
        "headswap_embedding_cache_entries 1234.0\n"
        'headswap_requests_total{code="OK",rpc="Embed"} 7.0\n'
    )
    assert gauges(text, ["headswap_embedding_cache_entries", "headswap_heads_allocated_bytes"]) == {
        "headswap_embedding_cache_entries": 1234.0,
        "headswap_heads_allocated_bytes": 0.0,
    }


def test_the_soak_reports_what_the_cache_and_the_head_stacks_do_not_account_for() -> None:
    from collections import Counter

    t = [0.0, 300.0, 600.0, 900.0, 1200.0, 1500.0]
    # Per 10 minutes over the second half (the last three samples): RSS +20 MiB, of which file-backed pages
    # +3 MiB, the head stacks +4 MiB, the cache +2,000 entries of 1,048.576 bytes (2 MiB): 11 MiB unaccounted for.
    rss, heads = [400, 500, 590, 600, 610, 620], [1.0, 3.0, 4.0, 5.0, 7.0, 9.0]
    files = [100.0, 110.0, 120.0, 120.0, 121.5, 123.0]
    s = Samples(t, rss, [20] * 6, [10] * 6, [0, 500, 800, 1000, 2000, 3000], heads, files)
    text = render(Counter({"classify OK": 10}), s, 1500, 10, 1.0, "python -m bench.soak", 1048.576)
    assert "held 0 entries at the start of the load and 3,000 at the end, +2,000 per 10 minutes" in text
    assert "+2.0 MiB; the head stacks" in text
    assert "held 1.0 MiB at the start and 9.0 MiB at the end, +4.0 MiB per 10 minutes" in text
    assert (
        "Not accounted for by the file-backed pages, the cache or the head stacks: +11.0 MiB per 10" in text
    )
    assert (
        "RSS moved +20.0 MiB (standard error 0.0; RSS between 600 and 620 MiB), of which file-backed" in text
    )
    assert "file-backed pages +3.0 MiB" in text
    assert RACES not in text
    refused = Counter({"classify OK": 10, "unknown NOT_FOUND": 3})
    assert RACES not in render(refused, s, 1500, 10, 1.0, "python -m bench.soak", 1048.576)
    refused["classify NOT_FOUND"] = 1  # a known tenant refused: the table says why
    assert RACES in render(refused, s, 1500, 10, 1.0, "python -m bench.soak", 1048.576)


def test_a_long_soak_reports_each_ten_minutes_so_levelling_off_shows() -> None:
    from collections import Counter

    from bench._soak_report import windows

    # 40 minutes, a sample a minute: RSS climbs 6 MiB per 10 minutes for 20 minutes, then stays; the cache
    # grows 1,000 entries (1 MiB at 1,048.576 B) per 10 minutes throughout; the head stacks stay put; the
    # file-backed pages grow 2 MiB over the first 10 minutes (code paged in), then stay.
    t = [60.0 * i for i in range(41)]
    rss = [500 + min(i, 20) * 0.6 for i in range(41)]
    entries = [100.0 * i for i in range(41)]
    files = [130 + min(i, 10) * 0.2 for i in range(41)]
    s = Samples(t, rss, [20] * 41, [10] * 41, entries, [3.0] * 41, files)
    rows = windows(s, 1048.576)
    assert [r[0] for r in rows] == ["0-10", "10-20", "20-30", "30-40"]
    assert [r[1:] for r in rows] == [
        ["505", "+6.0", "+2.0", "+1.0", "+0.0", "+3.0"],
        ["511", "+6.0", "+0.0", "+1.0", "+0.0", "+5.0"],
        ["512", "+0.0", "+0.0", "+1.0", "+0.0", "-1.0"],
        ["512", "+0.0", "+0.0", "+1.0", "+0.0", "-1.0"],
    ]
    assert "| 20-30 | 512 | +0.0 | +0.0 | +1.0 | +0.0 | -1.0 |" in render(
        Counter({"classify OK": 1}), s, 2400, 10, 1.0, "python -m bench.soak --seconds 2400", 1048.576
    )
    short = render(Counter({"classify OK": 1}), s, 1500, 10, 1.0, "python -m bench.soak", 1048.576)
    assert "window by window" not in short  # a run under 30 minutes has too few windows to say
    assert SHORT in short and SHORT not in render(
        Counter({"classify OK": 1}), s, 2400, 10, 1.0, "python -m bench.soak --seconds 2400", 1048.576
    )
