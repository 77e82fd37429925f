"""One head, two precisions: Banking77 accuracy of the same head answered by an fp32 and an int8 replica.

    python -m eval.cross_precision [--data DIR] [--backbone DIR] [--write-docs]

Starts a temporary PostgreSQL and two `headswap serve` replicas on it, one `--precision fp32` and one
`--precision int8` (same exported backbone), as a fleet of mixed CPUs would run. Through them:

- trains a head with `AdaptHead` (the server's defaults: held-out split, L2 chosen, calibrated) on all of
  Banking77's 10,003 training questions on the fp32 replica, then another on the int8 replica;
- classifies the 3,080 test questions with `Classify` on both replicas with each head (the replica that did
  not train it serves it from the shared store), checking that every reply names the precision that
  answered and the one that trained.

Target: each head's accuracy within 0.5 point on both replicas (the issue-22 criterion).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_BACKBONE, machine, markdown_table, publish, sh_block
from bench.serving import local_server, source_version
from eval.banking77 import CALL_CHUNK, Split, accuracy, data_dir, load_split

HEADING = "## int8 backbone: one head served by both precisions"
PRECISIONS = ("fp32", "int8")
MAX_DELTA = 0.5  # points


@dataclass(frozen=True)
class Served:
    trained_on: str
    served_by: str
    labels: tuple[str, ...]
    accuracy: float  # points
    l2: float


def classify_checked(client: Any, tenant: str, texts: Sequence[str], served: str, trained: str) -> list[str]:
    """Every test text through `Classify`, each reply checked for the precisions it names."""
    out: list[str] = []
    for start in range(0, len(texts), CALL_CHUNK):
        for p in client.classify(tenant, list(texts[start : start + CALL_CHUNK])):
            if (p.precision, p.trained_precision) != (served, trained):
                raise RuntimeError(f"{tenant}: answered by {p.precision} trained on {p.trained_precision}")
            out.append(p.label)
    return out


def wait_known(client: Any, tenant: str, version: int, timeout: float = 60.0) -> None:
    """Until the replica serves `version` (the other replica trained it; the store's feed brings it)."""
    from headswap.client import NotFound

    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.classify(tenant, ["hello"])[0].version == version:
                return
        except NotFound:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tenant} v{version} not served after {timeout:.0f}s")
        time.sleep(0.1)


def run(backbone: Path, train: Split, test: Split, work: Path) -> list[Served]:
    from headswap.client import Client
    from headswap.server.testing_postgres import postgres

    rows: list[Served] = []
    with postgres() as pg:
        dsn = pg.create_database("cross_precision")
        with (
            local_server(backbone, dsn, ["--store-migrate", "true", "--precision", "fp32"],
                         log_path=work / "fp32.log") as fp32,
            local_server(backbone, dsn, ["--store-migrate", "true", "--precision", "int8"],
                         log_path=work / "int8.log") as int8,
        ):  # fmt: skip
            replicas = {"fp32": fp32, "int8": int8}
            for trainer in PRECISIONS:
                tenant = f"banking77-{trainer}"
                with Client(replicas[trainer].target, timeout=3600) as client:
                    result = client.adapt_head(tenant, list(train.texts), list(train.labels), replace=True)
                if result.head is None or not result.activated:
                    raise RuntimeError(f"the head trained on {trainer} was not activated")
                print(f"  trained on {trainer}: version {result.version}, l2 {result.head.l2:g}", flush=True)
                for server in PRECISIONS:
                    with Client(replicas[server].target, timeout=3600) as client:
                        wait_known(client, tenant, result.version)
                        labels = classify_checked(client, tenant, test.texts, server, trainer)
                    score = 100 * accuracy(test.labels, labels)
                    rows.append(Served(trainer, server, tuple(labels), score, result.head.l2))
                    print(f"  trained on {trainer}, served by {server}: {score:.2f}", flush=True)
    return rows


def render(rows: list[Served], train_size: int, command: str) -> str:
    by = {(r.trained_on, r.served_by): r for r in rows}
    table, verdicts = [], []
    for trainer in PRECISIONS:
        a, b = by[(trainer, "fp32")], by[(trainer, "int8")]
        delta = b.accuracy - a.accuracy
        same = 100 * float(np.mean([x == y for x, y in zip(a.labels, b.labels, strict=True)]))
        ok = abs(delta) <= MAX_DELTA
        verdicts.append(ok)
        table.append([f"trained on {trainer} (l2 {a.l2:g})", f"{a.accuracy:.2f}", f"{b.accuracy:.2f}",
                      f"{delta:+.2f}", f"{same:.1f}%", "met" if ok else "missed"])  # fmt: skip
    m = machine()
    return "\n".join(
        [
            "Banking77 accuracy (points, 3,080 test questions) of one head answered by two replicas of one "
            "PostgreSQL store, `--precision fp32` and `--precision int8`: each head is trained once (all "
            f"{train_size:,} training questions, the server's defaults) on one replica and "
            "served by both, the other loading it from the store. Every reply named the precision that "
            f"answered and the one that trained. Target: within {MAX_DELTA} point on both replicas.",
            "",
            markdown_table(
                ["head", "served by fp32", "served by int8", "int8 − fp32", "same answer", "target"],
                table, [False, True, True, True, True, False],
            ),
            "",
            f"Targets {'all met' if all(verdicts) else 'not all met'}. Reproduce (starts a temporary "
            "PostgreSQL and both replicas):",
            "",
            *sh_block(command),
            "",
            f"Machine: {m.describe()}; {source_version()}.",
        ]
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    import os

    root = data_dir(args.data, os.environ)
    train, test = load_split(root, "train"), load_split(root, "test")
    with tempfile.TemporaryDirectory(prefix="headswap-cross-precision-") as tmp:
        rows = run(args.backbone, train, test, Path(tmp))
    body = render(
        rows, len(train), "python -m eval.cross_precision" + (" --write-docs" if args.write_docs else "")
    )
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    sys.exit(main())
