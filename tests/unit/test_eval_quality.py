"""The pure parts of eval/quality.py: the SST-2 reader, scores, targets and the docs section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.banking77 import DataError
from eval.quality import load_sst2
from eval.quality_report import (
    SYSTEMS,
    Score,
    Setting,
    check_targets,
    expected_calibration_error,
    format_table,
    render_section,
)


def test_load_sst2_reads_label_and_text(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.txt").write_text("1 a fine film\n\n0 dull , dull , dull\n", encoding="utf-8")
    split = load_sst2(tmp_path, "train")
    assert split.texts == ("a fine film", "dull , dull , dull")
    assert split.labels == ("positive", "negative")
    (tmp_path / "sst2" / "dev.txt").write_text("2 what\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.txt:1"):
        load_sst2(tmp_path, "dev")
    with pytest.raises(DataError, match="not found"):
        load_sst2(tmp_path, "test")


def test_expected_calibration_error() -> None:
    confidence = np.array([0.95, 0.95, 0.6, 0.7])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(
        0.5 * 0.45 + 0.25 * 0.4 + 0.25 * 0.3
    )
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([]), np.array([]))


def _setting(
    name: str, accuracies: tuple[float, float, float], ece: float = 0.02, refused: int = 0
) -> Setting:
    runs = {}
    for system, acc in zip(SYSTEMS, accuracies, strict=True):
        runs[system] = tuple(
            Score(acc + d, acc, ece, 0.5, refused=(system == "headswap" and i < refused))
            for i, d in enumerate((-0.01, 0.01))
        )
    return Setting(name, 616, runs)


def test_targets_follow_issue_12() -> None:
    settings = [
        _setting("Banking77 8-shot", (0.84, 0.797, 0.838)),
        _setting("Banking77 full", (0.92, 0.908, 0.932), ece=0.05),
        _setting("SST-2 8/class", (0.63, 0.63, 0.64), refused=1),
    ]
    verdicts = {(t.setting, t.description): t.holds for t in check_targets(settings)}
    assert verdicts[("Banking77 8-shot", "accuracy ≥ 83.5")]
    assert not verdicts[("Banking77 full", "accuracy ≥ 92.5")]
    assert not verdicts[("Banking77 full", "ECE ≤ 0.03")]
    assert verdicts[("Banking77 8-shot", "train s < 2")]
    assert not verdicts[("SST-2 8/class", "accuracy ≥ LogisticRegressionCV()")]
    assert verdicts[("SST-2 8/class", "accuracy ≥ LogisticRegression()")]
    assert not verdicts[("SST-2 8/class", "no refusals")]


def test_table_and_section() -> None:
    settings = [_setting("Banking77 8-shot", (0.84, 0.797, 0.838), refused=1)]
    table = format_table(settings)
    assert (
        "| Banking77 8-shot | 2 | 616 | headswap | 84.00 ± 1.00 | 84.00 ± 0.00 | 0.020 ± 0.000 | 0.500 | 1 |"
        in table
    )
    assert table.count("\n") == 1 + len(SYSTEMS)
    body = render_section(settings, check_targets(settings), "2 CPU cores", 12.0, "python -m eval.quality")
    assert "Machine: 2 CPU cores." in body and "python -m eval.quality" in body and "MISSED" in body
