"""Out-of-distribution abstention with defaults (issue 24), through a running server.

    python -m eval.ood [--data DIR] [--target HOST:PORT] [--quick] [--write-docs]

Without ``--target`` it starts a real ``headswap serve`` on a free loopback port with a temporary store
(the text backbone; with ``--image-backbone DIR`` the image one too). Each head is trained by ``AdaptHead``
with nothing but its examples and scored through ``Classify`` with defaults: Banking77 heads of 3, 10 and 77
intents with 10 examples per intent (and 8 for the 77-intent MTEB setting) and with every example. In-domain
inputs: the test sentences of the intents trained on. Off-topic: SST-2 test sentences (movie reviews) and
the test sentences of the Banking77 intents the head was not trained on. Reported: AUROC of ``ood_score``
(off-topic positive), the share of off-topic inputs flagged ``out_of_distribution``, the share of in-domain
ones flagged, accuracy on the in-domain inputs not flagged beside accuracy on all of them; the baseline is
the head's top probability (AUROC of 1 - top probability). Images, with ``--image-backbone``: a cats-vs-dogs
head on half of the Oxford pets sample, the other half in-domain, and off-topic photos (see
``OFF_TOPIC_PHOTOS``). ``--quick`` runs the 3-intent 10-shot setting on a sample (a test runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import replace_section
from eval.banking77 import (
    CALL_CHUNK,
    DEFAULT_BACKBONE,
    DOCS_PATH,
    DataError,
    data_dir,
    load_split,
    local_server,
    machine,
    wait_serving,
)
from eval.quality import load_sst2

SECTION_HEADING = "## Out-of-distribution abstention: Banking77 heads against off-topic inputs"
COMMAND = "python -m eval.ood --write-docs"
SEED = 24
THREE = ("card_arrival", "exchange_rate", "lost_or_stolen_card")  # the 3-intent head
# Off-topic photos for the image head: the two photos scikit-learn ships (a temple in China, a flower), the
# only photos in an installed package; nothing else ships that is neither a cat nor a dog.
OFF_TOPIC_PHOTOS = "sklearn.datasets.load_sample_images (china.jpg, flower.jpg)"


NOTES = (
    "",
    "Images (with `--image-backbone`, MobileNetV2): a cats-vs-dogs head on a random half of the Oxford pets "
    "sample (seed 24), the other half in-domain. Off-topic photos: the only photos that ship in an installed "
    f"package and are neither cats nor dogs, {OFF_TOPIC_PHOTOS}; two photos say that the score works on images "
    "end to end, not how well: no public off-topic photo set ships here.",
)


@dataclass(frozen=True)
class Row:
    setting: str
    examples: int
    in_domain: int
    off_topic: int
    auroc_ood: float
    auroc_top: float
    off_flagged: float
    in_flagged: float
    accuracy_all: float
    accuracy_unflagged: float
    threshold: float | None
    held_out_flagged: float | None
    confidence_cap: float | None
    held_out: int
    max_off_topic_probability: float


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic)."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="stable")
    ranks = np.empty(scores.size)
    ranks[order] = np.arange(1, scores.size + 1)
    # Average the ranks of ties.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = positives.size, negatives.size
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _classify(client: Any, tenant: str, texts: Sequence[str] = (), images: Sequence[bytes] = ()) -> list[Any]:
    out: list[Any] = []
    items: list[Any] = list(texts) or list(images)
    chunk = CALL_CHUNK if texts else 32
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        if texts:
            out += client.classify(tenant, part)
        else:
            out += client.classify(tenant, images=part)
    return out


def score(
    client: Any,
    setting: str,
    tenant: str,
    train: tuple[Sequence[Any], Sequence[str]],
    in_domain: tuple[Sequence[Any], Sequence[str]],
    off_topic: Sequence[Any],
    images: bool = False,
) -> Row:
    examples, labels = train
    if images:
        result = client.adapt_head(
            tenant, images=list(examples), labels=list(labels), replace=True, timeout=3600
        )
    else:
        result = client.adapt_head(tenant, list(examples), list(labels), replace=True, timeout=3600)
    if not result.activated:
        client.activate_head_version(tenant, result.version)
    kind = "images" if images else "texts"
    inside = _classify(client, tenant, **{kind: in_domain[0]})
    outside = _classify(client, tenant, **{kind: off_topic})
    client.delete_head(tenant)
    ood_in = np.array([p.ood_score for p in inside])
    ood_out = np.array([p.ood_score for p in outside])
    top_in = np.array([p.probability for p in inside])
    top_out = np.array([p.probability for p in outside])
    flag_in = np.array([p.out_of_distribution for p in inside])
    flag_out = np.array([p.out_of_distribution for p in outside])
    right = np.array([p.label == y for p, y in zip(inside, in_domain[1], strict=True)])
    m = result.metrics
    return Row(
        setting=setting,
        examples=len(examples),
        in_domain=len(inside),
        off_topic=len(outside),
        auroc_ood=auroc(ood_in, ood_out),
        auroc_top=auroc(-top_in, -top_out),
        off_flagged=float(flag_out.mean()),
        in_flagged=float(flag_in.mean()),
        accuracy_all=float(right.mean()),
        accuracy_unflagged=float(right[~flag_in].mean()) if (~flag_in).any() else float("nan"),
        threshold=m.ood_threshold,
        held_out_flagged=m.ood_flagged_share,
        confidence_cap=m.confidence_cap,
        held_out=m.validation_examples,
        max_off_topic_probability=float(top_out.max()),
    )


def few_shot(labels: Sequence[str], intents: Sequence[str], shots: int | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    picked = [rng.permutation(np.flatnonzero(y == c))[: shots or None] for c in intents]
    return np.sort(np.concatenate(picked))


def text_rows(client: Any, root: Path, quick: bool) -> list[Row]:
    train, test, sst = load_split(root, "train"), load_split(root, "test"), load_sst2(root, "test")
    intents_all = sorted(set(train.labels))
    ten = tuple(np.random.default_rng(SEED).choice(intents_all, 10, replace=False).tolist())
    plan: list[tuple[str, tuple[str, ...], int | None]] = [("3 intents, 10-shot", THREE, 10)]
    if not quick:
        plan += [
            ("3 intents, all examples", THREE, None),
            ("10 intents, 10-shot", ten, 10),
            ("10 intents, all examples", ten, None),
            ("77 intents, 8-shot", tuple(intents_all), 8),
            ("77 intents, 10-shot", tuple(intents_all), 10),
            ("77 intents, all examples", tuple(intents_all), None),
        ]
    rows = []
    for name, intents, shots in plan:
        part = train.subset(few_shot(train.labels, intents, shots, SEED))
        inside = np.flatnonzero(np.isin(np.asarray(test.labels), intents))
        other = np.flatnonzero(~np.isin(np.asarray(test.labels), intents))
        off = list(sst.texts)
        if quick:
            inside, off = inside[::2], off[::8]
            other = other[::8]
        off += [test.texts[i] for i in other]
        tenant = "ood-" + name.replace(" ", "").replace(",", "-")
        started = time.perf_counter()
        row = score(
            client,
            name,
            tenant,
            (part.texts, part.labels),
            ([test.texts[i] for i in inside], [test.labels[i] for i in inside]),
            off,
        )
        rows.append(row)
        print(f"{format_row(row)}  ({time.perf_counter() - started:.0f}s)", flush=True)
    return rows


def image_rows(client: Any, root: Path) -> list[Row]:
    from io import BytesIO

    from PIL import Image
    from sklearn.datasets import load_sample_images

    pets = root / "oxford-pets-sample"
    photos = sorted((pets / "cats").glob("*.jpg")) + sorted((pets / "dogs").glob("*.jpg"))
    if not photos:
        raise DataError(f"no photos under {pets}")
    labels = ["cat" if p.parent.name == "cats" else "dog" for p in photos]
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(photos))
    train_idx, test_idx = order[: len(order) // 2], order[len(order) // 2 :]
    off = []
    for array in load_sample_images().images:
        buffer = BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        off.append(buffer.getvalue())
    row = score(
        client,
        "cats vs dogs (images), half the pets sample",
        "ood-pets",
        ([photos[i].read_bytes() for i in train_idx], [labels[i] for i in train_idx]),
        ([photos[i].read_bytes() for i in test_idx], [labels[i] for i in test_idx]),
        off,
        images=True,
    )
    print(format_row(row), flush=True)
    return [row]


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}%"


HEADER = (
    "| head | examples | in-domain / off-topic inputs | AUROC ood_score | AUROC top prob. (baseline) | "
    "off-topic flagged | in-domain flagged (held-out) | accuracy: all / unflagged | threshold | "
    "Laplace (k+1)/(n+2) / (n+1)/(n+2) / max off-topic prob. |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: Row) -> str:
    threshold = "–" if r.threshold is None else f"{r.threshold:.3f}"
    cap = (
        "–"
        if r.confidence_cap is None
        else f"{r.confidence_cap:.3f} / {(r.held_out + 1) / (r.held_out + 2):.3f}"
    )
    return (
        f"| {r.setting} | {r.examples} | {r.in_domain} / {r.off_topic} | {r.auroc_ood:.4f} | {r.auroc_top:.4f} | "
        f"{_pct(r.off_flagged)} | {_pct(r.in_flagged)} ({_pct(r.held_out_flagged)}) | "
        f"{_pct(r.accuracy_all)} / {_pct(r.accuracy_unflagged)} | {threshold} | {cap} / "
        f"{r.max_off_topic_probability:.3f} |"
    )


def targets(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    by = {r.setting: r for r in rows}
    out = []
    three = by.get("3 intents, 10-shot")
    if three is not None:
        out.append(
            (
                f"3 intents 10-shot: off-topic flagged {_pct(three.off_flagged)} >= 95% while in-domain "
                f"flagged {_pct(three.in_flagged)} <= 5%",
                three.off_flagged >= 0.95 and three.in_flagged <= 0.05,
            )
        )
        out.append((f"3 intents 10-shot: AUROC {three.auroc_ood:.4f} >= 0.985", three.auroc_ood >= 0.985))
    eight = by.get("77 intents, 8-shot")
    if eight is not None:
        out.append((f"77 intents 8-shot: AUROC {eight.auroc_ood:.4f} >= 0.98", eight.auroc_ood >= 0.98))
        out.append(
            (
                f"77 intents 8-shot: accuracy unflagged {_pct(eight.accuracy_unflagged)} >= all "
                f"{_pct(eight.accuracy_all)}",
                eight.accuracy_unflagged >= eight.accuracy_all,
            )
        )
    return out


def render(rows: Sequence[Row], where: str, minutes: float) -> str:
    lines = [
        f"Measured with `{COMMAND}` ({minutes:.0f} min) on {where}: every head trained by AdaptHead with defaults "
        "and scored through Classify with defaults. In-domain: the Banking77 test sentences of the intents "
        "trained on; off-topic: the 1,821 SST-2 test sentences and the Banking77 test sentences of the other "
        "intents (77-intent heads: SST-2 only). Few-shot examples drawn with seed 24; the 10 intents drawn the "
        "same way. ood_score is 1 - the cosine similarity to the nearest stored training example; flagged: "
        "above the threshold learned on the head's held-out folds (in brackets: the share of held-out "
        "examples it flagged at training). AUROC: off-topic inputs scored above in-domain ones. Last column: "
        "with k of n held-out predictions right, their mean top probability is held to (k+1)/(n+2) and, for "
        "n <= 100, each one to (n+1)/(n+2); beside them the largest top probability any off-topic input got.",
        "",
        HEADER,
        *[format_row(r) for r in rows],
        "",
        "Targets (issue 24):",
        "",
        *[f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in targets(rows)],
        *NOTES,
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.ood", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data directory [HEADSWAP_DATA, default ../shared/data]")
    parser.add_argument("--target", default=None, help="use this running server instead of starting one")
    parser.add_argument(
        "--backbone", type=Path, default=DEFAULT_BACKBONE, help="text backbone for the own server"
    )
    parser.add_argument("--image-backbone", type=Path, default=None, help="also evaluate a cats-vs-dogs head")
    parser.add_argument("--quick", action="store_true", help="the 3-intent 10-shot setting on a sample")
    parser.add_argument("--write-docs", action="store_true", help=f"update the section in {DOCS_PATH}")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from headswap.client import Client

    def run(target: str) -> tuple[list[Row], str]:
        with Client(target, timeout=600.0) as client:
            provider = client.embed_full(["hello"]).backbone.provider
            rows = text_rows(client, root, args.quick)
            if args.image_backbone is not None:
                rows += image_rows(client, root)
        return rows, provider

    try:
        root = data_dir(args.data, os.environ)
        if args.target:
            wait_serving(args.target, 60.0)
            rows, provider = run(args.target)
        else:
            extra = [str(args.image_backbone)] if args.image_backbone is not None else []
            with local_server(args.backbone, extra_backbones=extra) as target:
                rows, provider = run(target)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows))
    for text, ok in targets(rows):
        print(f"{'met' if ok else 'MISSED'}: {text}")
    if args.write_docs:
        m = machine("no GPU" if provider.startswith("CPU") else f"backbone on {provider}")
        where = f"{m.cpus} CPU cores ({m.cpu_model}), {m.accelerator}; measured {m.date_utc} UTC"
        body = render(rows, where, (time.perf_counter() - started) / 60)
        old = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else ""
        DOCS_PATH.write_text(replace_section(old, SECTION_HEADING, body), encoding="utf-8")
        print(f"wrote {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
