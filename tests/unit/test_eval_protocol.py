"""The pure parts of eval/banking77.py: MTEB sampling, accuracy, targets, tables and the docs section."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eval.banking77 import (
    DEFAULT_DATA,
    SECTION_HEADING,
    DataError,
    Machine,
    Report,
    Run,
    Setting,
    accuracy,
    check_targets,
    data_dir,
    format_draws,
    format_table,
    load_split,
    mean_std,
    mteb_undersample,
    render_section,
    replace_section,
)

# A tiny synthetic, unbalanced frame: 5 labels with 12, 9, 20, 8 and 3 examples.
COUNTS = {"a": 12, "b": 9, "c": 20, "d": 8, "e": 3}
LABELS = [label for label, n in COUNTS.items() for _ in range(n)]
LABELS = [LABELS[i] for i in np.random.RandomState(0).permutation(len(LABELS))]


def test_each_draw_has_exactly_n_per_label_and_all_of_a_small_label() -> None:
    draws = mteb_undersample(LABELS, 4, draws=5, seed=42)
    assert len(draws) == 5
    for idx in draws:
        counts = Counter(LABELS[i] for i in idx)
        assert counts == {"a": 4, "b": 4, "c": 4, "d": 4, "e": 3}
        assert len(set(idx.tolist())) == idx.size  # no index twice


def test_sampling_is_deterministic_for_a_seed_and_differs_across_draws_and_seeds() -> None:
    first = mteb_undersample(LABELS, 4, draws=3, seed=42)
    again = mteb_undersample(LABELS, 4, draws=3, seed=42)
    other = mteb_undersample(LABELS, 4, draws=3, seed=7)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len({tuple(sorted(d.tolist())) for d in first}) == 3  # every draw is a different set
    assert any(not np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_shuffles_accumulate_across_draws_like_mteb() -> None:
    # MTEB shuffles the same index array again before every draw, with one generator, and keeps the
    # first n of every label in shuffled order.
    rng = np.random.RandomState(42)
    idxs = np.arange(len(LABELS))
    rng.shuffle(idxs)
    rng.shuffle(idxs)  # the second draw sees two shuffles
    expected: list[int] = []
    seen: Counter[str] = Counter()
    for i in idxs:
        if seen[LABELS[i]] < 4:
            expected.append(int(i))
            seen[LABELS[i]] += 1
    np.testing.assert_array_equal(mteb_undersample(LABELS, 4, draws=2, seed=42)[1], expected)


def test_sampling_is_pinned() -> None:
    # numpy's legacy RandomState stream is frozen, so these indices must never change.
    draws = mteb_undersample(["x", "y", "x", "y", "x", "y", "x", "y"], 2, draws=2, seed=42)
    assert [d.tolist() for d in draws] == [[1, 5, 0, 2], [7, 6, 1, 2]]


def test_sampling_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        mteb_undersample(LABELS, 0, draws=1)
    with pytest.raises(ValueError):
        mteb_undersample(LABELS, 1, draws=0)


def test_accuracy_and_mean_std() -> None:
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        accuracy([], [])
    mean, std = mean_std([1.0, 3.0])
    assert (mean, std) == (2.0, 1.0)  # population std, ddof=0
    assert mean_std([5.0]) == (5.0, 0.0)


def _run(hs: float, sk: float, hs_s: float = 0.1, sk_s: float = 0.05) -> Run:
    return Run(hs, sk, hs_s, 1.0, sk_s, 3, 10, 0.99)


def test_setting_summaries() -> None:
    s = Setting("8-shot", 80.04, (_run(0.80, 0.79, 0.2, 0.1), _run(0.78, 0.79, 0.2, 0.3)))
    assert s.headswap == pytest.approx((79.0, 1.0))
    assert s.sklearn == pytest.approx((79.0, 0.0))
    assert s.difference == pytest.approx(0.0)
    assert s.time_ratio == pytest.approx(1.0)  # (0.1 + 0.3) / 2 over 0.2


def test_targets_hold_and_fail() -> None:
    good = [
        Setting("8-shot", 80.04, (_run(0.795, 0.797),)),
        Setting("full", 90.8, (_run(0.908, 0.907),)),
    ]
    assert [t.holds for t in check_targets(good)] == [True, True, True, True]
    bad = [
        Setting("8-shot", 80.04, (_run(0.780, 0.787),)),  # 2.04 below published, 0.7 below sklearn
        Setting("full", 90.8, (_run(0.900, 0.908),)),  # 0.8 below sklearn, 0.8 below reference
    ]
    verdicts = [(t.setting, t.description.split(":")[0], t.holds) for t in check_targets(bad)]
    assert [v[2] for v in verdicts] == [False, False, False, True]


def test_table_shows_numbers_and_verdicts() -> None:
    settings = [
        Setting("8-shot", 80.04, (_run(0.80, 0.79), _run(0.78, 0.79))),
        Setting("full", 90.8, (_run(0.90, 0.908),)),
    ]
    table = format_table(settings, check_targets(settings))
    rows = table.splitlines()
    assert len(rows) == 4 and rows[0].startswith("| setting |")
    assert "| 8-shot | 2 | 79.00 ± 1.00 | 79.00 ± 0.00 | +0.00 | 80.04 |" in rows[2]
    assert rows[2].endswith("| met |")
    assert "| full | 1 | 90.00 | 90.80 | -0.80 | 90.80 |" in rows[3]
    assert rows[3].endswith("| missed |")
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    draws = format_draws(settings[0]).splitlines()
    assert draws[2] == "| headswap | 80.00 | 78.00 |" and draws[3] == "| scikit-learn | 79.00 | 79.00 |"


OTHER = "# Benchmarks\n\n## Embed throughput\n\nSomeone else's numbers.\n\n"
LATER = "## Latency\n\n```sh\n## not a heading, inside a fence\n```\n\nMore.\n"


def test_section_is_appended_then_replaced_keeping_other_sections() -> None:
    doc = replace_section(OTHER + LATER, SECTION_HEADING, "first body")
    assert doc.startswith(OTHER + LATER)
    assert doc.endswith(SECTION_HEADING + "\n\nfirst body\n")
    # Move it between the other two sections, then replace it there.
    middle = OTHER + SECTION_HEADING + "\n\nold\n### sub\nold too\n\n" + LATER
    updated = replace_section(middle, SECTION_HEADING, "new body\n")
    assert updated == OTHER + SECTION_HEADING + "\n\nnew body\n\n" + LATER
    assert replace_section(updated, SECTION_HEADING, "new body\n") == updated  # idempotent
    assert "Someone else's numbers." in updated and "inside a fence" in updated


def test_fenced_heading_lines_do_not_end_the_section() -> None:
    doc = OTHER + SECTION_HEADING + "\n\n```md\n## inside\n```\nold\n"
    assert replace_section(doc, SECTION_HEADING, "b") == OTHER + SECTION_HEADING + "\n\nb\n"


def test_empty_document_gets_a_title() -> None:
    assert replace_section("", SECTION_HEADING, "b") == "# Benchmarks\n\n" + SECTION_HEADING + "\n\nb\n"


def test_rendered_section_has_table_command_and_machine() -> None:
    settings = (Setting("8-shot", 80.04, (_run(0.80, 0.79), _run(0.78, 0.79))),)
    report = Report(
        settings,
        tuple(check_targets(settings)),
        Machine(2, "Some CPU", "no GPU", "2025-01-01 00:00"),
        90.0,
        0.5,
    )
    body = render_section(report)
    assert format_table(settings, report.targets) in body
    assert "python -m eval.banking77 --write-docs" in body
    assert "2 CPU cores (Some CPU), no GPU" in body and "2025-01-01 00:00 UTC" in body
    assert "\n## " not in body  # it must not end its own section


def test_data_dir_precedence_and_clear_errors(tmp_path: Path) -> None:
    assert data_dir("/flag", {"HEADSWAP_DATA": "/env"}) == Path("/flag")
    assert data_dir(None, {"HEADSWAP_DATA": "/env"}) == Path("/env")
    assert data_dir(None, {}) == DEFAULT_DATA
    with pytest.raises(DataError, match=r"banking77.*not found.*--data or HEADSWAP_DATA"):
        load_split(tmp_path, "train")
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train.csv").write_text('text,category\nhello,a\n"b, c",b\n', encoding="utf-8")
    split = load_split(tmp_path, "train")
    assert split.texts == ("hello", "b, c") and split.labels == ("a", "b")
    assert split.subset([1]).texts == ("b, c",)
    (tmp_path / "banking77" / "test.csv").write_text("text,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="category"):
        load_split(tmp_path, "test")
