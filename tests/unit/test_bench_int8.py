"""bench.int8_cpu and eval.int8_quality: the reports' ratios and verdicts, computed from the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench._embed_workload import Measurement, Workload
from bench.common import LatencySummary
from bench.int8_cpu import CONFIGS, ORT8, ORT32, ST, LowLoad, render
from eval.banking77 import Split
from eval.int8_quality import load_sst2


def m(workload: str, system: str, rate: float, config: str = "") -> Measurement:
    return Measurement(workload, system, "batch 16", int(rate * 10), 10.0, 1.0, None, config)


def test_render_ratios_against_each_peer() -> None:
    workloads = [Workload(w, w, ["a"], 3, 3.0, 3) for w in ("short", "long")]
    ms = [m("short", ST, 100), m("short", ORT8, 150), m("short", ORT32, 90)]
    ms += [m("long", ST, 20), m("long", ORT8, 25), m("long", ORT32, 18)]
    rates = dict(zip(CONFIGS, (210, 200, 190, 110), strict=True))
    for config, rate in rates.items():
        ms += [m("short", "headswap", rate, config), m("long", "headswap", rate / 10, config)]
    low = [LowLoad(c, 100, 10.0, LatencySummary.of([5.0, 6.0]), 4.0, 0.01) for c in CONFIGS]
    body = render(ms, low, workloads, 0.3, "python -m bench.int8_cpu")
    # int8 rows compare with ONNX Runtime on int8, the fp32 row with ONNX Runtime on fp32.
    assert "| short | `--precision int8` | 210 | 100 | 150 | 2.10 (met) | 1.40 |" in body
    assert "| long | `--precision int8` | 21 | 20 | 25 | 1.05 (missed) | 0.84 |" in body
    assert "| short | `--precision fp32` | 110 | 100 | 90 | 1.10 | 1.22 |" in body
    assert "plain ONNX Runtime int8 / fp32 = 1.67; headswap int8 / headswap fp32 = 1.91" in body


def test_sst2_labels(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.txt").write_text("1 a fine film .\n0 dull .\n\n")
    split = load_sst2(tmp_path, "dev")
    assert split == Split(("a fine film .", "dull ."), ("positive", "negative"))
    assert np.array_equal(np.array(split.labels) == "positive", [True, False])
