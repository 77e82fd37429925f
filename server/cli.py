"""Server-side commands: `headswap serve` and `headswap export` (need the `server` extra)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from headswap.server import logs
from headswap.server.config import ServerConfig


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser("serve", help="run the gRPC server (exports the default backbone on first start)")
    ServerConfig.add_arguments(serve)
    serve.set_defaults(func=run_serve)

    export = sub.add_parser("export", help="export the default backbone (all-MiniLM-L6-v2) to ONNX")
    export.add_argument("--out", type=Path, default=None, help="target directory (default: the server's)")
    export.add_argument("--force", action="store_true", help="replace an existing backbone there")
    export.add_argument(
        "--precision",
        choices=("all", "fp32", "fp16", "int8"),
        default="all",
        help="models to write besides fp32 (always written): fp16 for GPUs, int8 for CPUs; all (default) "
        "writes the three",
    )
    export.set_defaults(func=run_export)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_sources(args)
    except ValueError as exc:
        raise SystemExit(f"headswap serve: {exc}") from None
    logs.configure(config.log_level, config.log_format)
    from headswap.server.app import serve

    return serve(config)


def run_export(args: argparse.Namespace) -> int:
    logs.configure("INFO", "text")
    from headswap.server.export.text import ExportError, export_backbone

    out = args.out if args.out is not None else ServerConfig.from_sources().backbone_dir
    try:
        precisions = ("fp32", "fp16", "int8") if args.precision == "all" else ("fp32", args.precision)
        report = export_backbone(out, force=args.force, precisions=tuple(dict.fromkeys(precisions)))
    except ExportError as exc:
        logging.getLogger("headswap").error("export failed, nothing written: %s", exc)
        return 1
    m = report.manifest
    print(f"exported {m.name} to {report.out} in {report.seconds:.1f}s")
    print(f"  fingerprint {m.fingerprint}")
    print(f"  fused operators {dict(m.fused_operators)}")
    print(f"  parity vs PyTorch: min cosine fp32 {m.parity_min_cosine_fp32}, fp16 {m.parity_min_cosine_fp16}")
    if m.model_int8:
        print(
            f"  int8 {m.model_int8}: fingerprint {m.fingerprint_int8}, cosine to PyTorch mean "
            f"{m.parity_mean_cosine_int8}, min {m.parity_min_cosine_int8}"
        )
    return 0
