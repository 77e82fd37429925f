"""What the `headswap` client commands share: the connection flags and the client they make."""

from __future__ import annotations

import argparse
import os

from headswap.client.client import DEFAULT_TARGET, Client


def target_from(value: str | None) -> str:
    return value or os.environ.get("HEADSWAP_TARGET", DEFAULT_TARGET)


def add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default=None, help=f"server address [HEADSWAP_TARGET, default {DEFAULT_TARGET}]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    parser.add_argument("--api-key", default=None, help="API key, hsk_... [HEADSWAP_API_KEY]")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument(
        "--tls-ca", default=None, help="PEM file of the CA that signed the server [HEADSWAP_TLS_CA]"
    )
    parser.add_argument(
        "--tls-cert", default=None, help="PEM client certificate, for mutual TLS [HEADSWAP_TLS_CERT]"
    )
    parser.add_argument("--tls-key", default=None, help="PEM key of --tls-cert [HEADSWAP_TLS_KEY]")


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="texts; or image files and folders (taken as images when every INPUT is one, or with --images)",
    )
    parser.add_argument("--images", action="store_true", help="INPUTs are image files or folders")


def _read(path: str | None) -> bytes | None:
    return open(path, "rb").read() if path else None


def client_from_args(args: argparse.Namespace) -> Client:
    def pick(flag: str | None, env: str) -> str | None:
        return flag or os.environ.get(env) or None

    return Client(
        target_from(args.target),
        timeout=args.timeout,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=_read(pick(args.tls_ca, "HEADSWAP_TLS_CA")),
        certificate_chain=_read(pick(args.tls_cert, "HEADSWAP_TLS_CERT")),
        private_key=_read(pick(args.tls_key, "HEADSWAP_TLS_KEY")),
    )
