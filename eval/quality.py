"""Head quality with defaults: headswap against scikit-learn on Banking77 and SST-2, through a running server.

    python -m eval.quality [--data DIR] [--draws 10] [--target HOST:PORT] [--write-docs]

Without ``--target`` it starts a real ``headswap serve`` on a free loopback port with a temporary store.
Every headswap head is trained by ``AdaptHead`` with nothing but the examples and scored through
``Classify``; scikit-learn's ``LogisticRegression()`` and ``LogisticRegressionCV()`` are fitted on the same
server's ``Embed`` vectors of the same texts. Settings: Banking77 8-shot (MTEB protocol, 10 draws) and
full; SST-2 with 8 and 64 examples per class (10 draws each) and full. The table and the targets of issue
12 go to docs/BENCHMARKS.md with ``--write-docs``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import replace_section
from eval.banking77 import (
    CALL_CHUNK,
    DOCS_PATH,
    MTEB_SEED,
    DataError,
    Split,
    data_dir,
    embed_all,
    load_split,
    local_server,
    machine,
    mteb_undersample,
    parse_draws,
    server_arguments,
    wait_serving,
)
from eval.quality_report import (
    SYSTEMS,
    Score,
    Setting,
    check_targets,
    expected_calibration_error,
    format_table,
    format_targets,
    render_section,
)

SECTION_HEADING = "## Head quality with defaults: Banking77 and SST-2 against scikit-learn"
COMMAND = "python -m eval.quality --write-docs"
DEFAULT_DRAWS = 10


def load_sst2(root: Path, name: str) -> Split:
    """``root/sst2/{name}.txt``: one ``<label> <text>`` a line."""
    path = root / "sst2" / f"{name}.txt"
    if not path.is_file():
        raise DataError(f"{path} not found: this evaluation needs the SST-2 files under DIR/sst2/")
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        if label not in ("0", "1") or not text.strip():
            raise DataError(f"{path}:{number}: expected '<0|1> <text>', got {line[:60]!r}")
        texts.append(text)
        labels.append("positive" if label == "1" else "negative")
    return Split(tuple(texts), tuple(labels))


def _score(truth: Sequence[str], predicted: Sequence[str], confidence: np.ndarray, seconds: float) -> Score:
    from sklearn.metrics import f1_score

    y, p = np.asarray(truth), np.asarray(predicted)
    correct = y == p
    return Score(
        accuracy=float(correct.mean()),
        macro_f1=float(f1_score(y, p, average="macro")),
        ece=expected_calibration_error(confidence, correct),
        train_seconds=seconds,
    )


def _sklearn(model: Any, x: np.ndarray, y: Sequence[str], x_test: np.ndarray, test: Split) -> Score:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn announces changes to LogisticRegressionCV's defaults; the comparison is with today's.
        warnings.simplefilter("ignore", FutureWarning)
        started = time.perf_counter()
        model.fit(x, np.asarray(y))
        seconds = time.perf_counter() - started
    probabilities = model.predict_proba(x_test)
    predicted = model.classes_[probabilities.argmax(axis=1)]
    return _score(test.labels, [str(p) for p in predicted], probabilities.max(axis=1), seconds)


def _headswap(client: Any, tenant: str, train: Split, test: Split) -> Score:
    result = client.adapt_head(tenant, list(train.texts), list(train.labels), replace=True, timeout=3600)
    if not result.activated:
        print(f"  {tenant}: NOT ACTIVATED ({result.held_back_by}); forcing it to score it", flush=True)
        client.activate_head_version(tenant, result.version)
    predictions = []
    for start in range(0, len(test), CALL_CHUNK):
        predictions += client.classify(tenant, list(test.texts[start : start + CALL_CHUNK]))
    score = _score(
        test.labels,
        [p.label for p in predictions],
        np.array([p.probability for p in predictions]),
        result.metrics.train_seconds,
    )
    client.delete_head(tenant)
    return Score(score.accuracy, score.macro_f1, score.ece, score.train_seconds, refused=not result.activated)


def run_setting(
    client: Any,
    name: str,
    draws: list[np.ndarray],
    train: Split,
    x_train: np.ndarray,
    test: Split,
    x_test: np.ndarray,
) -> Setting:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    runs: dict[str, list[Score]] = {system: [] for system in SYSTEMS}
    for i, idx in enumerate(draws):
        part = train.subset(idx)
        tenant = f"q-{name.lower().replace(' ', '-').replace('/', '')}-{i}"
        runs["headswap"].append(_headswap(client, tenant, part, test))
        runs["LogisticRegression()"].append(
            _sklearn(LogisticRegression(), x_train[idx], part.labels, x_test, test)
        )
        runs["LogisticRegressionCV()"].append(
            _sklearn(LogisticRegressionCV(), x_train[idx], part.labels, x_test, test)
        )
        print(
            f"{name} draw {i} ({idx.size} examples): "
            + "  ".join(
                f"{s} {100 * runs[s][-1].accuracy:.2f} (ECE {runs[s][-1].ece:.3f}, {runs[s][-1].train_seconds:.2f}s)"
                for s in SYSTEMS
            ),
            flush=True,
        )
    examples = sum(idx.size for idx in draws) // len(draws)
    return Setting(name, examples, {s: tuple(v) for s, v in runs.items()})


def evaluate(target: str, root: Path, draws: int) -> tuple[list[Setting], str]:
    """The settings, and the backbone's execution provider."""
    from headswap.client import Client

    b77_train, b77_test = load_split(root, "train"), load_split(root, "test")
    sst_train, sst_test = load_sst2(root, "train"), load_sst2(root, "test")
    with Client(target, timeout=600.0) as client:
        provider = client.embed_full(["hello"]).backbone.provider
        started = time.perf_counter()
        x = {
            name: embed_all(client, split.texts)
            for name, split in [
                ("b77", b77_train),
                ("b77_test", b77_test),
                ("sst", sst_train),
                ("sst_test", sst_test),
            ]
        }
        print(f"embedded every text for scikit-learn in {time.perf_counter() - started:.0f}s", flush=True)
        # One throwaway training first, so that one-off start-up costs stay out of the timings.
        warm = b77_train.subset(mteb_undersample(b77_train.labels, 2, 1, MTEB_SEED)[0])
        client.adapt_head("q-warmup", list(warm.texts), list(warm.labels), replace=True)
        client.delete_head("q-warmup")

        def draw(train: Split, per_class: int) -> list[np.ndarray]:  # the MTEB few-shot draws
            return mteb_undersample(train.labels, per_class, draws, MTEB_SEED)

        everything_b77 = [np.arange(len(b77_train))]
        everything_sst = [np.arange(len(sst_train))]
        plan = [
            ("Banking77 8-shot", draw(b77_train, 8), b77_train, "b77", b77_test),
            ("Banking77 full", everything_b77, b77_train, "b77", b77_test),
            ("SST-2 8/class", draw(sst_train, 8), sst_train, "sst", sst_test),
            ("SST-2 64/class", draw(sst_train, 64), sst_train, "sst", sst_test),
            ("SST-2 full", everything_sst, sst_train, "sst", sst_test),
        ]
        settings = [
            run_setting(client, name, idx, train, x[key], test, x[f"{key}_test"])
            for name, idx, train, key, test in plan
        ]
    return settings, provider


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data directory [HEADSWAP_DATA, default ../shared/data]")
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="draws of each few-shot setting")
    server_arguments(parser)
    parser.add_argument("--write-docs", action="store_true", help=f"update the section in {DOCS_PATH}")
    args = parse_draws(parser, argv)
    started = time.perf_counter()
    try:
        root = data_dir(args.data, os.environ)
        if args.target:
            wait_serving(args.target, 60.0)
            settings, provider = evaluate(args.target, root, args.draws)
        else:
            with local_server(args.backbone, args.server_log) as target:
                settings, provider = evaluate(target, root, args.draws)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    targets = check_targets(settings)
    print("\n" + format_table(settings) + "\n\n" + format_targets(targets))
    if args.write_docs:
        m = machine("no GPU" if provider.startswith("CPU") else f"backbone on {provider}")
        where = f"{m.cpus} CPU cores ({m.cpu_model}), {m.accelerator}; measured {m.date_utc} UTC"
        body = render_section(settings, targets, where, (time.perf_counter() - started) / 60, COMMAND)
        old = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else ""
        DOCS_PATH.write_text(replace_section(old, SECTION_HEADING, body), encoding="utf-8")
        print(f"wrote {DOCS_PATH}")
    return 0 if all(t.holds for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
