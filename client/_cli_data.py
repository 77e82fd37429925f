"""`headswap embed`, `adapt` and `classify`: texts, or images from files and folders."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from headswap.client import _files
from headswap.client._cli_common import client_from_args
from headswap.client._progress import ProgressReporter
from headswap.client.results import AdaptProgress


def _images_asked(args: argparse.Namespace) -> list[Path] | None:
    """The image files a command's INPUT arguments name (--images, or every one an image file or folder)."""
    if args.images or _files.looks_like_images(args.inputs):
        return _files.image_paths(args.inputs)
    return None


def _cmd_embed(args: argparse.Namespace) -> int:
    paths = _images_asked(args)
    with client_from_args(args) as client:
        if paths is None:
            names, result = list(args.inputs), client.embed_full(args.inputs, backbone=args.backbone)
            vectors, truncated = result.embeddings, list(result.truncated)
        else:
            names, parts = [str(p) for p in paths], []
            with ProgressReporter(quiet=args.quiet, unit="image") as progress:
                for batch in _files.batches(paths):
                    parts.append(client.embed(images=batch, backbone=args.backbone))
                    progress.update("embedding", sum(len(p) for p in parts), len(paths))
            vectors, truncated = np.concatenate(parts), [False] * len(paths)
    if args.output:
        np.save(args.output, vectors)
        print(f"wrote {vectors.shape} {vectors.dtype} to {args.output}", file=sys.stderr)
        return 0
    key = "text" if paths is None else "image"
    for name, vector, cut in zip(names, vectors, truncated, strict=True):
        print(json.dumps({key: name, "truncated": cut, "embedding": [round(float(v), 6) for v in vector]}))
    return 0


def _read_csv(path: str) -> tuple[list[str], list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} needs the columns text,label (missing: {sorted(missing)})")
        rows = [(r["text"], r["label"]) for r in reader]
    return [t for t, _ in rows], [y for _, y in rows]


def _cmd_adapt(args: argparse.Namespace) -> int:
    texts: list[str] | None = None
    images: list[Path] | None = None
    if args.csv:
        texts, labels = _read_csv(args.csv)
    else:
        images, labels = _files.labelled_folder(args.images)
        print(f"{len(images)} images of {len(set(labels))} labels in {args.images}", file=sys.stderr)
    options: dict[str, Any] = {"kind": args.kind, "seed": args.seed, "backbone": args.backbone}
    if args.validation_fraction is not None:
        options["validation_fraction"] = args.validation_fraction
    if args.l2 is not None:
        options["l2"] = args.l2
    if args.max_epochs is not None:
        options["max_epochs"] = args.max_epochs

    with client_from_args(args) as client, ProgressReporter(quiet=args.quiet) as reporter:

        def progress(p: AdaptProgress) -> None:
            loss = p.train_loss if p.stage == "training" else None
            reporter.update(p.stage, p.done, p.total, loss=loss, val_acc=p.validation_accuracy)

        result = client.adapt_head(
            args.tenant,
            texts,
            labels,
            images=images,
            replace=args.replace,
            force_activate=args.force,
            on_progress=progress,
            **options,
        )
    assert result.head is not None, "the last call of adapt_head trains"
    m = result.metrics
    print(
        json.dumps(
            {
                "tenant": result.tenant,
                "version": result.version,
                "activated": result.activated,
                "active_version": result.active_version,
                "accuracy": round(m.accuracy, 4),
                "macro_f1": round(m.macro_f1, 4),
                "majority_baseline_accuracy": round(m.majority_baseline_accuracy, 4),
                "negative_transfer": m.negative_transfer,
                "evaluated_on": m.evaluated_on,
                "examples": result.head.example_count,
                "labels": len(result.head.labels),
                "embedded": result.embedded,
                "cache_hits": result.cache_hits,
                "train_seconds": round(m.train_seconds, 3),
                "l2": result.head.l2,
                "l2_source": result.head.l2_source,
                "temperature": round(result.head.temperature, 4),
                "expected_calibration_error": m.expected_calibration_error,
                # How uncertain the two are on this many held-out predictions (95% bootstrap).
                "expected_calibration_error_interval": m.expected_calibration_error_interval,
                "log_loss": m.log_loss,
                "log_loss_interval": m.log_loss_interval,
                "validation_examples": m.validation_examples,
                "confidence_cap": m.confidence_cap,
                "ood_threshold": m.ood_threshold,
                "ood_flagged_share": m.ood_flagged_share,
                "held_back_by": result.held_back_by or None,  # null when activated
                "checks": [{"rule": c.rule, "passed": c.passed, "detail": c.detail} for c in result.checks],
            }
        )
    )
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    paths = _images_asked(args)
    with client_from_args(args) as client:
        if paths is None:
            names = list(args.inputs)
            predictions = client.classify(
                args.tenant,
                args.inputs,
                top_k=args.top_k,
                version=args.version,
                min_probability=args.min_probability,
                ignore_ood=args.ignore_ood,
            )
        else:
            names, predictions = [str(p) for p in paths], []
            for batch in _files.batches(paths):
                predictions += client.classify(
                    args.tenant,
                    images=batch,
                    top_k=args.top_k,
                    version=args.version,
                    min_probability=args.min_probability,
                    ignore_ood=args.ignore_ood,
                )
    key = "text" if paths is None else "image"
    for name, p in zip(names, predictions, strict=True):
        labels = [{"label": s.label, "probability": round(s.probability, 4)} for s in p.labels]
        row = {key: name, "version": p.version, "labels": labels, "abstained": p.abstained}
        # NaN (a head stored without its examples) is not JSON: printed as null.
        row["ood_score"] = round(p.ood_score, 4) if math.isfinite(p.ood_score) else None
        row["out_of_distribution"] = p.out_of_distribution
        print(json.dumps(row))
    return 0
