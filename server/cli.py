"""Server-side commands: `headswap serve`, `headswap export` and `headswap store` (need the `server` extra)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from headswap.server import logs
from headswap.server.config import ServerConfig

if TYPE_CHECKING:
    from headswap.server.export.common import ExportReport


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser("serve", help="run the gRPC server (exports the default backbone on first start)")
    ServerConfig.add_arguments(serve)
    serve.set_defaults(func=run_serve)

    export = sub.add_parser(
        "export", help="export a backbone to ONNX: the default text one (all-MiniLM-L6-v2), or an image one"
    )
    export.add_argument("--out", type=Path, default=None, help="target directory (default: the server's)")
    export.add_argument("--force", action="store_true", help="replace an existing backbone there")
    kind = export.add_mutually_exclusive_group()
    kind.add_argument(
        "--image", choices=["mobilenet_v2"], default=None, help="an ImageNet CNN, cut before its classifier"
    )
    kind.add_argument(
        "--onnx-image", type=Path, default=None, help="your ONNX image classifier, cut at --feature-output"
    )
    export.add_argument(
        "--weights", type=Path, default=None, help="mobilenet_v2-b0353104.pth (default: fetched, verified)"
    )
    export.add_argument(
        "--feature-output", default=None, help="the tensor of --onnx-image to cut at (N,C,H,W or N,C)"
    )
    export.add_argument("--size", type=int, default=224, help="--onnx-image: the square input side")
    export.add_argument(
        "--resize", type=int, default=256, help="--onnx-image: shorter side before the centre crop"
    )
    export.add_argument(
        "--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406], help="--onnx-image: per RGB channel"
    )
    export.add_argument(
        "--std", type=float, nargs=3, default=[0.229, 0.224, 0.225], help="--onnx-image: per RGB channel"
    )
    export.add_argument(
        "--check-images", type=Path, default=None, help="photos to check parity on (default: bundled ones)"
    )
    export.add_argument(
        "--precision",
        choices=("all", "fp32", "fp16", "int8"),
        default="all",
        help="models to write besides fp32 (always written): fp16 for GPUs, int8 for CPUs; all (default) "
        "writes the three",
    )
    export.set_defaults(func=run_export)

    store = sub.add_parser("store", help="work on a store offline (no server needs to run)")
    actions = store.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="verify every tenant; with --repair, mend what can be mended")
    check.add_argument("--store", default=None, help="the store (default: the server's) [HEADSWAP_STORE]")
    check.add_argument("--repair", action="store_true", help="drop damaged versions and example sets")
    check.set_defaults(func=run_store_check)
    migrate = actions.add_parser("migrate", help="create or migrate a PostgreSQL store's schema")
    migrate.add_argument(
        "--store", default=None, help="postgresql:// URL (default: the server's) [HEADSWAP_STORE]"
    )
    migrate.set_defaults(func=run_store_migrate)
    copy = actions.add_parser(
        "copy", help="copy a local store into a PostgreSQL store (idempotent, verified)"
    )
    copy.add_argument("--from", dest="source", required=True, help="the local store directory")
    copy.add_argument("--to", dest="target", required=True, help="the postgresql:// URL")
    copy.set_defaults(func=run_store_copy)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig.from_sources(args)
    except ValueError as exc:
        raise SystemExit(f"headswap serve: {exc}") from None
    logs.configure(config.log_level, config.log_format)
    from headswap.server.app import serve

    code = serve(config)
    # Drained, stopped and logged: leave now. The interpreter's own teardown (joining idle pool threads,
    # finalising PyTorch and ONNX Runtime) took 1 to 8 s after "stopped" and does nothing a store or a
    # client needs: every write was fsynced, every connection closed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_export(args: argparse.Namespace) -> int:
    """A progress bar (a line per step when not on a terminal), then a short summary (what, where,
    fingerprint, fusions, parity, seconds); the reason on failure."""
    logs.configure("WARNING", "text")
    from headswap.client._progress import ProgressReporter
    from headswap.server.export.common import ExportError
    from headswap.server.export.fetch import FetchError
    from headswap.server.export.progress import IMAGE_STEPS, TEXT_STEPS, reporting

    if args.onnx_image and not args.feature_output:
        print(
            "headswap export --onnx-image: name the tensor to cut at with --feature-output", file=sys.stderr
        )
        return 2
    steps = IMAGE_STEPS if args.image or args.onnx_image else TEXT_STEPS
    bar = ProgressReporter(unit="step")

    def show(name: str) -> None:
        bar.update(f"export: {name}", steps.index(name) if name in steps else 0, len(steps))

    try:
        with bar, reporting(show):
            report = _export(args)
            bar.update("export: done", len(steps), len(steps))
    except (ExportError, FetchError) as exc:
        logging.getLogger("headswap").error("export failed, nothing written: %s", exc)
        return 1
    m = report.manifest
    print(
        f"exported {m.name} ({m.input_kind}, {m.embedding_dim} dimensions) to {report.out} in {report.seconds:.1f}s"
    )
    print(f"  fingerprint {m.fingerprint}")
    if m.fused_operators:
        print(f"  fused operators {dict(m.fused_operators)}")
    print(
        f"  parity with its source: min cosine fp32 {m.parity_min_cosine_fp32}, fp16 {m.parity_min_cosine_fp16}"
    )
    if m.model_int8:
        print(
            f"  int8 {m.model_int8}: fingerprint {m.fingerprint_int8}, cosine to PyTorch mean "
            f"{m.parity_mean_cosine_int8}, min {m.parity_min_cosine_int8} (gate: mean 0.99, min 0.98; "
            f"{m.parity_int8_cpu or 'unrecorded'} int8 kernels)"
        )
    return 0


def _export(args: argparse.Namespace) -> ExportReport:
    from headswap.server.export.text import export_backbone

    config = ServerConfig.from_sources()
    cache = config.home / "cache"
    photos = (
        sorted(p for p in args.check_images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if args.check_images
        else []
    )
    if not (args.image or args.onnx_image):
        precisions = ("fp32", "fp16", "int8") if args.precision == "all" else ("fp32", args.precision)
        return export_backbone(
            args.out if args.out is not None else config.backbone_dir,
            force=args.force,
            precisions=tuple(dict.fromkeys(precisions)),
        )
    from headswap.server.export.image import export_mobilenet, export_onnx_image

    out = args.out or config.home / "backbones" / (args.image or args.onnx_image.stem)
    if args.image:
        return export_mobilenet(out, weights=args.weights, cache=cache, check_images=photos, force=args.force)
    return export_onnx_image(
        args.onnx_image, args.feature_output, out, size=args.size, resize=args.resize,
        mean=args.mean, std=args.std, cache=cache, check_images=photos, force=args.force,
    )  # fmt: skip


def run_store_check(args: argparse.Namespace) -> int:
    """Exit 0 when every tenant is intact (or was repaired), 1 when damage remains."""
    logs.configure("WARNING", "text")
    from headswap.server.store.check import check_store

    url = args.store or ServerConfig.from_sources().store_url
    findings = check_store(Path(url).expanduser(), repair=args.repair)
    for f in findings:
        verb = "repaired" if args.repair else "to repair"
        print(f"{f.tenant}: {f.problem} ({verb}: {f.repair})")
    print(f"{len(findings)} problem(s) found" + (", repaired" if args.repair and findings else ""))
    return 0 if args.repair or not findings else 1


def _store_url(args: argparse.Namespace) -> str:
    return str(args.store or ServerConfig.from_sources().store_url)


def run_store_migrate(args: argparse.Namespace) -> int:
    logs.configure("INFO", "text")
    from headswap.server.store import is_postgres
    from headswap.server.store.postgres_schema import redact

    url = _store_url(args)
    if not is_postgres(url):
        print(f"headswap store migrate: {url} is a local store: it needs no migration", file=sys.stderr)
        return 2
    import psycopg

    from headswap.server.store.postgres_schema import migrate

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            before, after = migrate(conn)
    except psycopg.Error as exc:
        print(f"headswap store migrate: {redact(url)}: {exc}", file=sys.stderr)
        return 1
    print(f"schema of {redact(url)}: version {before} -> {after}")
    return 0


def run_store_copy(args: argparse.Namespace) -> int:
    logs.configure("WARNING", "text")
    from headswap.server.store import is_postgres
    from headswap.server.store.copy import copy_store

    if not is_postgres(args.target):
        print("headswap store copy: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    results = copy_store(Path(args.source).expanduser(), args.target)
    for r in results:
        print(f"{r.tenant}: {r.outcome}" + (f" ({r.detail})" if r.detail else ""))
    bad = [r for r in results if r.outcome in ("conflict", "damaged")]
    print(f"{len(results)} tenant(s): {len(results) - len(bad)} copied or already there, {len(bad)} not")
    return 1 if bad else 0


def clamp_epoch(seconds: float) -> float:
    """Seconds since the epoch within years 1 to 9999 (what timestamps and datetimes can say)."""
    return min(max(seconds, -62135596800.0), 253402300799.0)


def offline_keys(
    url: str, action: str, args: argparse.Namespace, ttl: float | None
) -> tuple[list[dict[str, object]], str | None]:
    """`headswap keys ... --store URL`: the same actions against the store itself, with no server running (how
    the first admin key is made). The pepper comes from HEADSWAP_AUTH_PEPPER or HEADSWAP_AUTH_PEPPER_FILE,
    as the server reads it."""
    import datetime as dt
    import time

    from headswap.server import keys
    from headswap.server.services.keys import MAX_TTL_S
    from headswap.server.store import open_store

    if action == "create" and ttl is not None and not 0 < ttl <= MAX_TTL_S:
        # Checked before anything is stored, as the server checks CreateApiKey (a key past year 9999 was stored,
        # then every listing failed).
        raise ValueError(
            f"--ttl-days must be above 0 and at most {MAX_TTL_S // 86400} (or unset: never expires)"
        )
    config = ServerConfig.from_sources()
    pepper = replace(config.auth, mode="keys").load_pepper()
    assert pepper is not None
    store = open_store(url, migrate=True)

    def when(t: float | None) -> str | None:  # any stored expiry lists (clamped to the years datetime knows)
        return dt.datetime.fromtimestamp(clamp_epoch(t), dt.UTC).isoformat() if t is not None else None

    def row(k: keys.ApiKey) -> dict[str, object]:
        return {
            "id": k.id,
            "role": k.role,
            "tenant": k.tenant,
            "name": k.name,
            "created_at": when(k.created_at),
            "expires_at": when(k.expires_at),
            "revoked_at": when(k.revoked_at),
        }

    try:
        if action == "create":
            role, tenant = ("admin", None) if args.admin else ("tenant", args.tenant)
            expires = time.time() + ttl if ttl is not None else None
            key, record = keys.new_key(pepper, role, tenant, expires, args.name)
            store.put_key(record)
            return [row(record)], key
        if action == "list":
            return [row(k) for k in store.list_keys()], None
        return [row(store.revoke_key(args.id, time.time()))], None
    finally:
        store.close()
