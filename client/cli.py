"""The `headswap` command.

Client commands (`embed`, `health`) need only the base install; `serve` and `export` need the `server`
extra and are loaded from `headswap.server` only when asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from headswap.client.client import DEFAULT_TARGET, Client
from headswap.client.errors import HeadswapError
from headswap.client.results import AdaptProgress


def _target(value: str | None) -> str:
    return value or os.environ.get("HEADSWAP_TARGET", DEFAULT_TARGET)


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default=None, help=f"server address [HEADSWAP_TARGET, default {DEFAULT_TARGET}]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")


def _cmd_embed(args: argparse.Namespace) -> int:
    with Client(_target(args.target), timeout=args.timeout) as client:
        result = client.embed_full(args.texts)
    if args.output:
        np.save(args.output, result.embeddings)
        print(f"wrote {result.embeddings.shape} {result.embeddings.dtype} to {args.output}", file=sys.stderr)
        return 0
    for text, vector, truncated in zip(args.texts, result.embeddings, result.truncated, strict=True):
        row = {"text": text, "truncated": truncated, "embedding": [round(float(v), 6) for v in vector]}
        print(json.dumps(row))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    import csv

    with open(args.csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            print(
                f"headswap adapt: {args.csv} needs the columns text,label (missing: {sorted(missing)})",
                file=sys.stderr,
            )
            return 2
        rows = [(r["text"], r["label"]) for r in reader]
    options: dict[str, Any] = {"kind": args.kind, "seed": args.seed}
    if args.validation_fraction is not None:
        options["validation_fraction"] = args.validation_fraction
    if args.l2 is not None:
        options["l2"] = args.l2
    if args.max_epochs is not None:
        options["max_epochs"] = args.max_epochs

    def progress(p: AdaptProgress) -> None:
        if not args.quiet:
            print(f"  {p.stage}: {p.done}/{p.total}", file=sys.stderr)

    with Client(_target(args.target), timeout=args.timeout) as client:
        result = client.adapt_head(
            args.tenant,
            [t for t, _ in rows],
            [y for _, y in rows],
            replace=args.replace,
            force_activate=args.force,
            on_progress=progress,
            **options,
        )
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
                "held_back_by": result.held_back_by,
                "checks": [{"rule": c.rule, "passed": c.passed, "detail": c.detail} for c in result.checks],
            }
        )
    )
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    with Client(_target(args.target), timeout=args.timeout) as client:
        predictions = client.classify(
            args.tenant,
            args.texts,
            top_k=args.top_k,
            version=args.version,
            min_probability=args.min_probability,
        )
    for text, p in zip(args.texts, predictions, strict=True):
        labels = [{"label": s.label, "probability": round(s.probability, 4)} for s in p.labels]
        print(json.dumps({"text": text, "version": p.version, "labels": labels, "abstained": p.abstained}))
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    with Client(_target(args.target), timeout=args.timeout) as client:
        if args.tenant:
            d = client.get_head(args.tenant)
            versions = [
                {
                    "version": v.version,
                    "kind": v.kind,
                    "accuracy": round(v.metrics.accuracy, 4),
                    "created_at": v.created_at,
                }
                for v in d.versions
            ]
            print(
                json.dumps(
                    {
                        "tenant": d.tenant,
                        "active_version": d.active_version,
                        "examples": d.example_count,
                        "versions": versions,
                    }
                )
            )
        else:
            for h in client.list_heads():
                print(
                    json.dumps(
                        {
                            "tenant": h.tenant,
                            "active_version": h.active_version,
                            "versions": h.version_count,
                            "labels": len(h.labels),
                        }
                    )
                )
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc

    from headswap.client import _health

    with Client(_target(args.target), timeout=args.timeout) as client:
        try:
            status = _health.check(client._channel, args.service, timeout=args.timeout)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
    print(status)
    return 0 if status == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headswap", description="One frozen backbone, many tenant heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", help="embed texts with the server's backbone; prints JSON lines")
    _add_client_args(embed)
    embed.add_argument("--output", help="write the embeddings to this .npy file instead")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.set_defaults(func=_cmd_embed)

    adapt = sub.add_parser("adapt", help="train a tenant's head on a CSV file with columns text,label")
    _add_client_args(adapt)
    adapt.add_argument("--tenant", required=True)
    adapt.add_argument("--csv", required=True, help="CSV with a header row: text,label")
    adapt.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    adapt.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        help="hold out this share once instead of cross-validating; 0 trains on everything",
    )
    adapt.add_argument(
        "--l2",
        type=float,
        default=None,
        help="L2 strength, scikit-learn's 1/C (default: chosen by validation)",
    )
    adapt.add_argument("--max-epochs", type=int, default=None)
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--replace", action="store_true", help="drop the tenant's stored examples first")
    adapt.add_argument(
        "--force", action="store_true", help="activate even when the promotion gate holds it back"
    )
    adapt.add_argument("--quiet", action="store_true", help="no progress lines")
    adapt.set_defaults(func=_cmd_adapt, timeout=600.0)

    classify = sub.add_parser("classify", help="classify texts with a tenant's head; prints JSON lines")
    _add_client_args(classify)
    classify.add_argument("--tenant", required=True)
    classify.add_argument("--top-k", type=int, default=1)
    classify.add_argument("--version", type=int, default=0, help="pin a version (default: the active one)")
    classify.add_argument(
        "--min-probability", type=float, default=0.0, help="mark predictions below this probability abstained"
    )
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.set_defaults(func=_cmd_classify)

    heads = sub.add_parser("heads", help="list tenants with heads, or describe one with --tenant")
    _add_client_args(heads)
    heads.add_argument("--tenant", default=None)
    heads.set_defaults(func=_cmd_heads)

    health = sub.add_parser("health", help="ask the server's grpc.health.v1 service; exit 0 when SERVING")
    _add_client_args(health)
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.set_defaults(func=_cmd_health)

    try:
        from headswap.server.cli import add_commands
    except ImportError as exc:
        missing = str(exc)

        def _needs_server(args: argparse.Namespace) -> int:
            print(
                f"headswap {args.command}: needs the server extra (pip install 'headswap[server]'): {missing}"
            )
            return 2

        for name in ("serve", "export"):
            sub.add_parser(name, help="(needs the server extra)").set_defaults(func=_needs_server)
    else:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HeadswapError as exc:
        print(f"headswap {args.command}: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
