"""bench.embed_throughput: request splitting, per-thread CPU grouping, the report's ratios."""

from __future__ import annotations

import pytest

from bench._embed_report import Report, best, render
from bench._embed_workload import Measurement, ServerSide, Workload, split_requests
from bench.common import LatencySummary, machine
from bench.serving import BatchLogStats, thread_delta, thread_groups


def test_split_requests_covers_every_text_in_order_within_the_sizes() -> None:
    texts = [f"t{i}" for i in range(1000)]
    requests = split_requests(texts, 1, 16, seed=4)
    assert [t for r in requests for t in r] == texts
    assert all(1 <= len(r) <= 16 for r in requests)
    assert {len(r) for r in requests[:-1]} >= {1, 16}  # the whole range is used
    assert requests == split_requests(texts, 1, 16, seed=4)
    assert requests != split_requests(texts, 1, 16, seed=5)


def test_split_requests_fixed_size_and_bad_bounds() -> None:
    requests = split_requests([str(i) for i in range(130)], 64, 64)
    assert [len(r) for r in requests] == [64, 64, 2]
    with pytest.raises(ValueError):
        split_requests(["a"], 0, 4)
    with pytest.raises(ValueError):
        split_requests(["a"], 5, 4)


def test_thread_delta_groups_numbered_threads_and_counts_new_ones_whole() -> None:
    before = {1: ("main-loop", 1.0), 2: ("hs-tokenize_0", 0.5), 3: ("hs-tokenize_1", 0.5)}
    after = {
        1: ("main-loop", 1.5),
        2: ("hs-tokenize_0", 1.0),
        3: ("hs-tokenize_1", 0.75),
        4: ("hs-backbone_0", 2.0),
        5: ("idle", 0.0),
    }
    assert thread_delta(before, after) == {"hs-backbone": 2.0, "hs-tokenize": 0.75, "main-loop": 0.5}


def _m(workload: str, system: str, setting: str, rate: float, config: str = "") -> Measurement:
    server = None
    if system == "headswap":
        server = ServerSide(10, LatencySummary.of([1.0, 2.0]), 1.0, 0.5, 3.0, 5.0, 8.0, 1.0)
    return Measurement(workload, system, setting, int(rate * 10), 10.0, 20.0, server, config)


def test_report_ratios_use_the_best_peer_and_say_met_or_missed() -> None:
    ms = [
        _m("short", "onnxruntime", "batch 64", 100),
        _m("short", "onnxruntime", "batch 256", 80),
        _m("short", "sentence-transformers", "batch 64", 50),
        _m("short", "headswap", "32 callers × 1–16 texts", 95),
        _m("short", "headswap", "32 callers × 64 texts", 60),
        _m("short", "headswap", "32 callers × 1–16 texts", 85, "--batch-max-items 32"),
    ]
    assert best(ms, "short", "onnxruntime") == 100
    assert best(ms, "short", "headswap", "") == 95
    workload = Workload("short", "4–40 words", ["a b c d"] * 3, 6, 6.0, 6)
    report = Report(machine(), 0.3, [workload], ms, ["", "--batch-max-items 32"], "python -m x", 10.0, [])
    text = render(report)
    # No length-sorted ONNX Runtime figure: its ratio is a dash, never a made-up number.
    assert "| short | defaults | 95 | 100 | 50 | 0.95 (met) | 1.90 (met) | – |" in text
    assert "| short | `--batch-max-items 32` | 85 | 100 | 50 | 0.85 (missed) | 1.70 (met) | – |" in text
    assert "No GPU here" in text and "load average 0.30" in text
    assert (
        "- short: best headswap configuration defaults, 95 texts/s = 0.95 × ONNX Runtime (target 0.9: met) "
        "and 1.90 × sentence-transformers (target 1.3: met)." in text
    )


def test_batch_log_stats() -> None:
    lines = ["4 10 30 0.5", "", "2 20 40 1.5\n"]
    stats = BatchLogStats.parse(lines, wall_seconds=4.0)
    assert stats == BatchLogStats(batches=2, mean_items=3.0, padding_efficiency=70 / 80, busy_share=0.5)
    assert BatchLogStats.parse([], 1.0) is None


def test_thread_groups_sorts_threads_by_job() -> None:
    groups = thread_groups(
        {"hs-backbone": 2.0, "ort-intra-op": 1.5, "main-loop": 0.25, "rayon-tokenize": 0.5, "python": 0.125}
    )
    assert groups == {
        "forward pass": 3.5,
        "event loop": 0.25,
        "tokenizing": 0.5,
        "gRPC core": 0.0,
        "other": 0.125,
    }
