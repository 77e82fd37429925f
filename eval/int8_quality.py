"""What the int8 backbone costs in quality: the same heads on int8 and on fp32 embeddings, through the server.

    python -m eval.int8_quality [--data DIR] [--backbone DIR] [--draws 10] [--write-docs]

Starts `headswap serve --precision fp32`, then `--precision int8`, on the same exported backbone (each on a
free loopback port with a temporary store), and through each:

- embeds Banking77 (train 10,003, test 3,080) and SST-2 (train 6,920, test 1,821) with `Embed`, and reports
  the cosine of every int8 vector to its fp32 one;
- trains a headswap head with `AdaptHead` (linear, C=1, no validation split) on all of Banking77's and of
  SST-2's training rows, and classifies the test sets with `Classify`;
- fits scikit-learn's `LogisticRegression` on the server's embeddings: Banking77 8-shot under the MTEB protocol
  (10 draws, C=1, `max_iter=100`; `eval.banking77.mteb_undersample`), Banking77 full with C=1 and C=10 (the
  issue's measurement), SST-2 full with C=1.

Targets: every accuracy within 0.5 point of fp32's; cosine mean >= 0.99.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_BACKBONE, machine, markdown_table, publish, sh_block
from bench.serving import local_server, source_version
from eval.banking77 import (
    DataError,
    Split,
    accuracy,
    classify_all,
    data_dir,
    embed_all,
    load_split,
    mean_std,
    mteb_undersample,
)

HEADING = "## int8 backbone: quality"
PRECISIONS = ("fp32", "int8")
MAX_DELTA = 0.5  # points
MIN_MEAN_COSINE = 0.99


def load_sst2(root: Path, name: str) -> Split:
    """``root/sst2/{name}.txt``: ``<label> <text>`` a line (label 0 or 1)."""
    path = root / "sst2" / f"{name}.txt"
    if not path.is_file():
        raise DataError(f"{path} not found: this evaluation needs SST-2 under DIR/sst2/")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            rows.append((text.strip(), "positive" if label == "1" else "negative"))
    return Split(tuple(t for t, _ in rows), tuple(y for _, y in rows))


def fit_predict(x: np.ndarray, y: Sequence[str], x_test: np.ndarray, c: float) -> list[str]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=100, random_state=42)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, np.asarray(y))
    return [str(p) for p in model.predict(x_test)]


@dataclass(frozen=True)
class Served:
    precision: str
    fingerprint: str
    vectors: dict[str, np.ndarray]  # by set name
    headswap: dict[str, float]  # AdaptHead + Classify accuracy by setting


def serve_and_measure(backbone: Path, precision: str, sets: dict[str, Split], work: Path) -> Served:
    from headswap.client import Client

    with (
        local_server(
            backbone, work / f"store-{precision}", ["--precision", precision], log_path=work / "s.log"
        ) as server,
        Client(server.target, timeout=3600) as client,
    ):
        info = client.embed_full(["hello"]).backbone
        if info.precision != precision:
            raise RuntimeError(f"asked for {precision}, the server serves {info.precision}")
        vectors = {}
        for name, split in sets.items():
            vectors[name] = embed_all(client, split.texts)
            print(f"  {precision}: embedded {name} ({len(split)})", flush=True)
        headswap = {}
        for setting, train, test in (
            ("Banking77 full", sets["banking77 train"], sets["banking77 test"]),
            ("SST-2 full", sets["sst2 train"], sets["sst2 test"]),
        ):
            tenant = setting.split()[0].lower().replace("-", "")
            result = client.adapt_head(
                tenant, list(train.texts), list(train.labels), replace=True, timeout=3600,
                kind="linear", validation_fraction=0.0, l2=1.0, max_epochs=10, seed=0,
            )  # fmt: skip
            if not result.activated:
                raise RuntimeError(f"{precision}: the {setting} head was not activated")
            headswap[setting] = 100 * accuracy(test.labels, classify_all(client, tenant, test.texts))
            print(f"  {precision}: headswap {setting} {headswap[setting]:.2f}", flush=True)
    return Served(precision, info.fingerprint, vectors, headswap)


def sklearn_rows(served: Served, sets: dict[str, Split], draws: int) -> dict[str, tuple[float, float]]:
    """Accuracy (mean, std over draws) by setting, in points."""
    v = served.vectors
    b_train, b_test, s_train, s_test = (
        sets[k] for k in ("banking77 train", "banking77 test", "sst2 train", "sst2 test")
    )
    out: dict[str, tuple[float, float]] = {}
    shots = []
    for idx in mteb_undersample(b_train.labels, 8, draws):
        sub = b_train.subset(idx)
        shots.append(
            100
            * accuracy(
                b_test.labels, fit_predict(v["banking77 train"][idx], sub.labels, v["banking77 test"], 1.0)
            )
        )
    out[f"Banking77 8-shot ({draws} draws), C=1"] = mean_std(shots)
    for c in (1.0, 10.0):
        pred = fit_predict(v["banking77 train"], b_train.labels, v["banking77 test"], c)
        out[f"Banking77 full, C={c:g}"] = (100 * accuracy(b_test.labels, pred), 0.0)
    pred = fit_predict(v["sst2 train"], s_train.labels, v["sst2 test"], 1.0)
    out["SST-2 full, C=1"] = (100 * accuracy(s_test.labels, pred), 0.0)
    return out  # fmt: skip


def render(runs: dict[str, Served], sets: dict[str, Split], draws: int, command: str) -> str:
    fp32, int8 = runs["fp32"], runs["int8"]
    cos_rows = []
    for name in sets:
        cos = np.sum(fp32.vectors[name] * int8.vectors[name], axis=1)
        cos_rows.append(
            [name, f"{len(cos):,}", f"{cos.mean():.4f}", f"{np.percentile(cos, 1):.4f}", f"{cos.min():.4f}"]
        )
    acc = {p: sklearn_rows(runs[p], sets, draws) for p in PRECISIONS}
    rows, verdicts = [], []
    settings = [
        (f"headswap AdaptHead, {s}", {p: (runs[p].headswap[s], 0.0) for p in PRECISIONS})
        for s in fp32.headswap
    ]
    settings += [(f"scikit-learn, {s}", {p: acc[p][s] for p in PRECISIONS}) for s in acc["fp32"]]
    for name, by in settings:
        delta = by["int8"][0] - by["fp32"][0]
        ok = abs(delta) <= MAX_DELTA or delta > 0
        verdicts.append(ok)
        fmt = (lambda m: f"{m[0]:.2f} ± {m[1]:.2f}") if "8-shot" in name else (lambda m: f"{m[0]:.2f}")
        rows.append([name, fmt(by["fp32"]), fmt(by["int8"]), f"{delta:+.2f}", "met" if ok else "missed"])
    all_cos = np.concatenate([np.sum(fp32.vectors[n] * int8.vectors[n], axis=1) for n in sets])
    m = machine()
    lines = [
        "Accuracy (points) of the same heads on embeddings from `headswap serve --precision fp32` and "
        "`--precision int8` (same exported backbone, each server's own `Embed`, `AdaptHead` and `Classify`). "
        f"Target: int8 within {MAX_DELTA} point of fp32 everywhere (better counts as met); cosine of int8 to "
        f"fp32 vectors mean ≥ {MIN_MEAN_COSINE}.",
        "",
        markdown_table(["setting", "fp32", "int8", "int8 − fp32", "target"], rows, [False, True, True, True, False]),
        "",
        "Cosine of each int8 embedding to the fp32 one of the same text:",
        "",
        markdown_table(["texts", "count", "mean", "1st percentile", "min"], cos_rows, [False, True, True, True, True]),
        "",
        f"- All {len(all_cos):,} texts: mean {all_cos.mean():.4f} (target {MIN_MEAN_COSINE}: "
        f"{'met' if all_cos.mean() >= MIN_MEAN_COSINE else 'missed'}), min {all_cos.min():.4f}; accuracy "
        f"targets {'all met' if all(verdicts) else 'not all met'}.",
        f"- Fingerprints: fp32 `{fp32.fingerprint[:12]}`, int8 `{int8.fingerprint[:12]}`; heads are bound to the "
        "weights (the fp32 fingerprint), so each precision also serves heads trained on the other "
        "(`python -m eval.cross_precision`).",
        "",
        "Reproduce (starts its own servers):",
        "",
        *sh_block(command),
        "",
        f"Machine: {m.describe()}; {source_version()}.",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    import os

    root = data_dir(args.data, os.environ)
    sets = {
        "banking77 train": load_split(root, "train"),
        "banking77 test": load_split(root, "test"),
        "sst2 train": load_sst2(root, "train"),
        "sst2 test": load_sst2(root, "test"),
    }
    with tempfile.TemporaryDirectory(prefix="headswap-int8-eval-") as tmp:
        runs = {p: serve_and_measure(args.backbone, p, sets, Path(tmp)) for p in PRECISIONS}
    command = "python -m eval.int8_quality" + (f" --draws {args.draws}" if args.draws != 10 else "")
    body = render(runs, sets, args.draws, command + (" --write-docs" if args.write_docs else ""))
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    sys.exit(main())
