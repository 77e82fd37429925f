"""bench.classify_latency: tenant training sets, the open-loop schedule, the report's ratio."""

from __future__ import annotations

import itertools

import pytest

from bench._classify_report import Report, render
from bench._classify_workload import (
    OpenLoop,
    ServerTimings,
    Throughput,
    Training,
    open_loop_seconds,
    schedule,
    tenant_specs,
)
from bench.common import LatencySummary, machine

ROWS = [(f"text {label} {i}", f"intent{label}") for label in range(30) for i in range(6)]


def test_tenant_specs_shape() -> None:
    specs = tenant_specs(ROWS, 200, seed=2)
    assert len(specs) == 200
    assert len({s.name for s in specs}) == 200
    assert len(set(specs[0].labels)) == 4  # the single-tenant head is a full-size one
    for s in specs:
        assert len(s.texts) == len(s.labels)
        counts = {label: s.labels.count(label) for label in set(s.labels)}
        assert 2 <= len(counts) <= 4
        assert set(counts.values()) == {4}
        assert all(
            text.split()[1] == label.removeprefix("intent")
            for text, label in zip(s.texts, s.labels, strict=True)
        )


def test_tenant_specs_reuse_a_small_pool_of_texts() -> None:
    specs = tenant_specs(ROWS, 500, pool_labels=24, per_label=4)
    distinct = {t for s in specs for t in s.texts}
    assert len(distinct) <= 24 * 4  # so the embedding cache serves all but the first sight of each
    assert specs == tenant_specs(ROWS, 500, pool_labels=24, per_label=4)


def test_tenant_specs_rejects_too_little_data() -> None:
    with pytest.raises(ValueError):
        tenant_specs(ROWS[:12], 10, pool_labels=24)
    with pytest.raises(ValueError):
        tenant_specs(ROWS, 10, min_labels=1)


def test_schedule_is_evenly_spaced_at_the_rate() -> None:
    offsets = schedule(50, 2)
    assert len(offsets) == 100
    assert offsets[0] == 0 and offsets[-1] == pytest.approx(99 / 50)
    assert all(b - a == pytest.approx(0.02) for a, b in itertools.pairwise(offsets))
    with pytest.raises(ValueError):
        schedule(0, 5)


def test_open_loop_seconds_aims_at_1000_calls_within_bounds() -> None:
    assert open_loop_seconds(10, quick=False) == 60
    assert open_loop_seconds(25, quick=False) == 40
    assert open_loop_seconds(100, quick=False) == 20
    assert open_loop_seconds(100, quick=True) == 4


def _t(mode: str, calls: int) -> Throughput:
    timings = ServerTimings(1.0, 0.1, 5.0, 0.5, 8.0)
    return Throughput(mode, calls, 10.0, LatencySummary.of([1.0, 3.0]), timings, 5.0, 1.0)


def test_report_mixed_over_single() -> None:
    runs = [_t("single", 1000), _t("mixed", 850), _t("single", 1000), _t("mixed", 950)]
    report = Report(machine(), 0.2, "", Training(1000, 100.0, 10.0, 96, 3000, 4), [], runs, [], "cmd", 1000)
    text = render(report)
    assert "Mixed / single: 90.0 / 100.0 calls/s = **0.90** (target ≥ 0.9: met)" in text
    runs[1] = _t("mixed", 700)
    text = render(
        Report(machine(), 0.2, "", Training(1000, 100.0, 10.0, 96, 3000, 4), [], runs, [], "c", 1000)
    )
    assert "**0.82** (target ≥ 0.9: missed)" in text
    assert "No GPU here" in text
    # 8.0 ms total, of which 1.0 + 0.1 + 5.0 + 0.5 accounted for: 1.4 ms in none of the timings.
    assert "1–1 ms of a call's 8–8 ms server total are in none of" in text
    assert "- Mixed / single = 0.82: serving 1,000 tenants costs throughput." in text


def _open(queue_ms: float) -> OpenLoop:
    timings = ServerTimings(queue_ms, 0.3, 7.0, 0.5, 8.5)
    return OpenLoop(50.0, 20.0, 1000, 0, LatencySummary.of([9.0, 12.0]), 2.0, timings, 10.0)


def test_report_says_whether_a_lone_call_waits_for_company() -> None:
    """The finding follows the numbers and the window the server ran with, never a fixed sentence."""
    training = Training(1000, 100.0, 10.0, 96, 3000, 4)

    def said(queue_ms: float, flags: str = "") -> str:
        return render(Report(machine(), 0.2, flags, training, [_open(queue_ms)], [], [], "c", 1000))

    assert "does not wait for company: the mean queue time is 0.3–0.3 ms" in said(0.3)
    assert "window of 2 ms" in said(0.3)  # the declared default
    assert "waits out the batcher's window for company: the mean queue time is 1.9–1.9 ms" in said(1.9)
    assert "does not wait" in said(1.9, "--batch-max-wait-ms 5")
    assert "waits out" in said(4.5, "--batch-max-wait-ms=5")
