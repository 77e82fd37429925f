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

import numpy as np

from headswap.client.client import DEFAULT_TARGET, Client
from headswap.client.results import HeadswapError


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
