"""The pure half of eval/quality.py: scores, the targets of issue 12, the table and the docs section."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.common import sh_block

SYSTEMS = ("headswap", "LogisticRegression()", "LogisticRegressionCV()")
ECE_BINS = 15
# Targets, with defaults and nothing passed but examples (issue 12).
B77_FEW_SHOT_MIN = 83.5
B77_FULL_MIN = 92.5
ECE_MAX = 0.03
FEW_SHOT_SECONDS = 2.0
FULL_SECONDS = 10.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |top probability - accuracy| over equal-width confidence bins, weighted by bin size."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError("need as many confidences as outcomes, and at least one")
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return float(
        sum(
            np.mean(index == b) * abs(confidence[index == b].mean() - correct[index == b].mean())
            for b in range(bins)
            if np.any(index == b)
        )
    )


@dataclass(frozen=True)
class Score:
    """One system on one training set, scored on the full test split."""

    accuracy: float  # fraction
    macro_f1: float
    ece: float
    train_seconds: float  # headswap: server-side train_seconds; scikit-learn: fit() on one BLAS thread
    refused: bool = False  # headswap only: the gate did not activate the version


@dataclass(frozen=True)
class Setting:
    name: str  # e.g. "Banking77 8-shot"
    examples: int  # training examples per draw (mean)
    runs: dict[str, tuple[Score, ...]]  # system -> one score per draw

    def mean(self, system: str, field: str) -> float:
        return float(np.mean([getattr(s, field) for s in self.runs[system]]))

    def std(self, system: str, field: str) -> float:
        return float(np.std([getattr(s, field) for s in self.runs[system]]))

    @property
    def draws(self) -> int:
        return len(self.runs["headswap"])

    def refusals(self) -> int:
        return sum(s.refused for s in self.runs["headswap"])


@dataclass(frozen=True)
class Target:
    setting: str
    description: str
    value: str
    holds: bool


def check_targets(settings: Sequence[Setting]) -> list[Target]:
    out: list[Target] = []
    for s in settings:
        hs = 100 * s.mean("headswap", "accuracy")
        sk = 100 * s.mean("LogisticRegression()", "accuracy")
        cv = 100 * s.mean("LogisticRegressionCV()", "accuracy")
        if s.name == "Banking77 8-shot":
            out.append(Target(s.name, f"accuracy ≥ {B77_FEW_SHOT_MIN}", f"{hs:.2f}", hs >= B77_FEW_SHOT_MIN))
        if s.name == "Banking77 full":
            out.append(Target(s.name, f"accuracy ≥ {B77_FULL_MIN}", f"{hs:.2f}", hs >= B77_FULL_MIN))
        if s.name.startswith("Banking77"):
            ece = s.mean("headswap", "ece")
            out.append(Target(s.name, f"ECE ≤ {ECE_MAX}", f"{ece:.3f}", ece <= ECE_MAX))
            limit = FEW_SHOT_SECONDS if "8-shot" in s.name else FULL_SECONDS
            secs = s.mean("headswap", "train_seconds")
            out.append(Target(s.name, f"train s < {limit:g}", f"{secs:.2f}", secs < limit))
        if s.name.startswith("SST-2"):
            out.append(Target(s.name, "accuracy ≥ LogisticRegressionCV()", f"{hs - cv:+.2f}", hs >= cv))
        out.append(Target(s.name, "accuracy ≥ LogisticRegression()", f"{hs - sk:+.2f}", hs >= sk))
        out.append(Target(s.name, "no refusals", str(s.refusals()), s.refusals() == 0))
    return out


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    value = f"{scale * mean:.{digits}f}"
    return f"{value} ± {scale * std:.{digits}f}" if n > 1 else value


def format_table(settings: Sequence[Setting]) -> str:
    lines = [
        "| set | draws | examples | system | accuracy | macro-F1 | ECE | train s | refused |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for s in settings:
        n = s.draws
        for system in SYSTEMS:
            refused = str(s.refusals()) if system == "headswap" else "–"
            lines.append(
                f"| {s.name} | {n} | {s.examples:,} | {system} | "
                f"{_pm(s.mean(system, 'accuracy'), s.std(system, 'accuracy'), n)} | "
                f"{_pm(s.mean(system, 'macro_f1'), s.std(system, 'macro_f1'), n)} | "
                f"{_pm(s.mean(system, 'ece'), s.std(system, 'ece'), n, scale=1.0, digits=3)} | "
                f"{s.mean(system, 'train_seconds'):.3f} | {refused} |"
            )
    return "\n".join(lines)


def format_targets(targets: Sequence[Target]) -> str:
    return "\n".join(
        f"- {t.setting}: {t.description}: {t.value} → {'met' if t.holds else 'MISSED'}" for t in targets
    )


def render_section(
    settings: Sequence[Setting], targets: Sequence[Target], machine: str, wall_minutes: float, command: str
) -> str:
    lines = [
        "Heads trained by `AdaptHead` with its defaults (nothing passed but the examples: cross-validated L2, "
        "one temperature, refit on every example) and scored through `Classify` on the full test split, "
        "beside scikit-learn's `LogisticRegression()` and `LogisticRegressionCV()` (defaults: C=1; ten Cs "
        "from 1e-4 to 1e4 chosen by 5-fold accuracy) fitted on the same server's `Embed` vectors of the "
        "same training texts. Mean ± standard deviation (ddof=0) over draws; accuracy and macro-F1 in "
        "points; ECE is the expected calibration error of the top label (15 equal-width bins) on the test "
        "split. *train s*: headswap's server-side `train_seconds` (model selection, calibration and refit; "
        "embedding excluded), scikit-learn's `fit()` on one BLAS thread, like the server's one training "
        "thread. *refused*: draws whose first head the promotion gate did not activate.",
        "",
        format_table(settings),
        "",
        "Targets (issue 12):",
        "",
        format_targets(targets),
        "",
        f"Reproduce (starts its own server; took {wall_minutes:.0f} min here, embedding included):",
        "",
        *sh_block(command),
        "",
        f"Machine: {machine}.",
        "",
        "Method:",
        "",
        "- Banking77 (PolyAI, `../shared/data/banking77`): 8-shot draws follow MTEB's `_undersample_data` "
        "(one `np.random.RandomState(42)` reshuffling one index array before each of 10 draws, the first 8 "
        "of every intent kept: 616 examples); full is all 10,003 training rows; test is 3,080 rows.",
        "- SST-2 (`../shared/data/sst2`, sentence level, binary): 8 and 64 examples per class drawn the same "
        "way (10 draws) from the 6,920 training sentences, and all of them; test is the 1,821 test sentences "
        "(dev is not used).",
        "- headswap's accuracy, macro-F1 and ECE come from `Classify` replies: the label and probability the "
        "server serves. Each draw is a fresh tenant (`replace=True`), so the gate compares with the majority "
        "baseline only.",
    ]
    return "\n".join(lines) + "\n"
