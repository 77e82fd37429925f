"""The `headswap` command.

Client commands (`embed`, `adapt`, `classify`, `heads`, `health`, `keys`) need only the base install; `serve`
and `export` need the `server` extra and are loaded from `headswap.server` only when asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from headswap.client._cli_common import add_client_args, add_input_args, client_from_args
from headswap.client._cli_data import _cmd_adapt, _cmd_classify, _cmd_embed
from headswap.client._wire import HEAD_KIND_CODES
from headswap.client.errors import HeadswapError
from headswap.client.results import ApiKeyInfo


def _cmd_heads(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        if args.tenant:
            d = client.get_head(args.tenant)
            versions = [
                {
                    "version": v.version,
                    "kind": v.kind,
                    "accuracy": round(v.metrics.accuracy, 4),
                    "created_at": v.created_at.isoformat(),
                    "trained_precision": v.trained_precision,
                    "served_precision": v.served_precision,
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

    with client_from_args(args) as client:
        try:
            status = _health.check(client._channel, args.service, timeout=args.timeout)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
    print(status)
    return 0 if status == "SERVING" else 1


def _key_row(info: ApiKeyInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "role": info.role,
        "tenant": info.tenant,
        "name": info.name,
        "created_at": info.created_at.isoformat(),
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
    }


def _cmd_keys(args: argparse.Namespace) -> int:
    ttl = args.ttl_days * 86400 if getattr(args, "ttl_days", None) else None
    if args.store:
        try:
            from headswap.server.cli import offline_keys
        except ImportError as exc:
            print(f"headswap keys --store: needs the server extra (pip install 'headswap[server]'): {exc}")
            return 2
        rows, key = offline_keys(args.store, args.action, args, ttl)
    else:
        with client_from_args(args) as client:
            key = None
            if args.action == "create":
                created = client.create_api_key(
                    "admin" if args.admin else "tenant", args.tenant, name=args.name, ttl=ttl
                )
                rows, key = [_key_row(created.info)], created.key
            elif args.action == "list":
                rows = [_key_row(k) for k in client.list_api_keys()]
            else:
                rows = [_key_row(client.revoke_api_key(args.id))]
    for row in rows:
        print(json.dumps(row))
    if key:
        print(f"key (shown once, keep it secret): {key}", file=sys.stderr)
        print(key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headswap", description="One frozen backbone, many tenant heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser(
        "embed", help="embed texts, or image files and folders, with the server's backbone; prints JSON lines"
    )
    add_client_args(embed)
    add_input_args(embed)
    embed.add_argument("--output", help="write the embeddings to this .npy file instead")
    embed.add_argument("--backbone", default="", help="a served backbone's name (default: by input kind)")
    embed.add_argument("--quiet", action="store_true", help="no progress")
    embed.set_defaults(func=_cmd_embed)

    adapt = sub.add_parser(
        "adapt", help="train a tenant's head on a CSV file (text,label) or a folder of images, one per label"
    )
    add_client_args(adapt)
    adapt.add_argument("--tenant", required=True)
    source = adapt.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with a header row: text,label")
    source.add_argument(
        "--images",
        metavar="DIR",
        help="a folder with one folder of images per label (DIR/cat/*.jpg, DIR/dog/...)",
    )
    adapt.add_argument(
        "--backbone", default="", help="the served backbone to train on (default: by input kind)"
    )
    adapt.add_argument("--kind", choices=list(HEAD_KIND_CODES), default="linear")
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

    classify = sub.add_parser(
        "classify", help="classify texts, or image files and folders, with a tenant's head; prints JSON lines"
    )
    add_client_args(classify)
    add_input_args(classify)
    classify.add_argument("--tenant", required=True)
    classify.add_argument("--top-k", type=int, default=1)
    classify.add_argument("--version", type=int, default=0, help="pin a version (default: the active one)")
    classify.add_argument(
        "--min-probability", type=float, default=0.0, help="mark predictions below this probability abstained"
    )
    classify.add_argument(
        "--ignore-ood",
        action="store_true",
        help="do not mark out-of-distribution inputs abstained (ood_score and out_of_distribution still shown)",
    )
    classify.set_defaults(func=_cmd_classify)

    heads = sub.add_parser("heads", help="list tenants with heads, or describe one with --tenant")
    add_client_args(heads)
    heads.add_argument("--tenant", default=None)
    heads.set_defaults(func=_cmd_heads)

    health = sub.add_parser("health", help="ask the server's grpc.health.v1 service; exit 0 when SERVING")
    add_client_args(health)
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.set_defaults(func=_cmd_health)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke (admin key, or --store offline)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; prints it once")
    role = create.add_mutually_exclusive_group(required=True)
    role.add_argument("--tenant", default=None, help="a tenant key, for this tenant")
    role.add_argument("--admin", action="store_true", help="an admin key")
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument(
        "--ttl-days", type=float, default=None, help="expire after this many days (default: never)"
    )
    listing = actions.add_parser("list", help="list the keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id", help="the key's id (hsk_<id>_...)")
    for action in (create, listing, revoke):
        add_client_args(action)
        action.add_argument(
            "--store",
            default=None,
            help="work on this store directly, offline (the first admin key) [needs the server extra]",
        )
        action.set_defaults(func=_cmd_keys)

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
    except (OSError, ValueError) as exc:  # a file that is not there, a folder of the wrong layout
        print(f"headswap {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
