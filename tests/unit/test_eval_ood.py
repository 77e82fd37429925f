"""The pure parts of eval/ood.py: its AUROC, rows and targets."""

from __future__ import annotations

import numpy as np

from eval.ood import Row, auroc, format_row, render, targets


def test_auroc_is_the_mann_whitney_statistic_with_ties_halved() -> None:
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=200), rng.normal(0.5, size=150)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert abs(auroc(neg, pos) - pairs) < 1e-12


def row(setting: str, **changes: float) -> Row:
    base = dict(
        setting=setting, examples=30, in_domain=120, off_topic=4000, auroc_ood=0.99, auroc_top=0.9,
        off_flagged=0.96, in_flagged=0.04, accuracy_all=0.9, accuracy_unflagged=0.92, threshold=0.4,
        held_out_flagged=0.03, confidence_cap=0.97, held_out=30, max_off_topic_probability=0.9,
    )  # fmt: skip
    base.update(changes)
    return Row(**base)  # type: ignore[arg-type]


def test_targets_and_section() -> None:
    good = [row("3 intents, 10-shot"), row("77 intents, 8-shot", auroc_ood=0.999)]
    assert all(ok for _, ok in targets(good))
    bad = [row("3 intents, 10-shot", off_flagged=0.9), row("77 intents, 8-shot", accuracy_unflagged=0.85)]
    assert [ok for _, ok in targets(bad)] == [False, True, True, False]
    text = render(good, "2 CPU cores", 3.0)
    assert format_row(good[0]) in text and "MISSED" not in text
    assert "–" in format_row(row("x", threshold=None))  # type: ignore[arg-type]
