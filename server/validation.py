"""Checks on caller input, made before any work is done."""

from __future__ import annotations

import re
from collections.abc import Sequence

from headswap.server.domain import Input
from headswap.server.errors import InvalidArgument, ResourceExhausted
from headswap.server.input_kinds import KINDS

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_inputs(
    inputs: Sequence[Input],
    max_inputs: int,
    input_kind: str | None,
    what: str = "inputs",
    max_bytes: int = 0,
    target: str = "the backbone",
) -> None:
    """A non-empty batch within the limits, every input of the backbone's kind (unless None) and not blank."""
    if not inputs:
        raise InvalidArgument(f"{what} is empty: send at least one input")
    if len(inputs) > max_inputs:
        raise InvalidArgument(
            f"{what} has {len(inputs)} items, more than this server's maximum of {max_inputs} per call: "
            "split the batch"
        )
    if max_bytes and (size := sum(item.nbytes for item in inputs)) > max_bytes:
        raise ResourceExhausted(
            f"{what} carry {size} bytes, more than this server's limit of {max_bytes} per call: send fewer or "
            "smaller inputs per call"
        )
    for i, item in enumerate(inputs):
        if input_kind is not None:
            check_kind(item, input_kind, f"{what}[{i}]", target)
        kind = KINDS[item.kind]
        if kind.is_blank(item.content):
            raise InvalidArgument(f"{what}[{i}] {kind.blank}")


def check_kind(item: Input, input_kind: str, where: str, target: str = "the backbone") -> None:
    if item.kind != input_kind:
        raise InvalidArgument(
            f"{where} is {KINDS[item.kind].article} {item.kind}, but {target} takes {input_kind}s: send `{input_kind}`"
        )


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        shown = tenant if len(tenant) <= 80 else tenant[:77] + "..."
        raise InvalidArgument(
            f"tenant {shown!r} is not a valid name: use 1 to 64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return tenant


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def check_request_id(request_id: str) -> str:
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            f"request_id {request_id[:140]!r} is not an idempotency key: use 1 to 128 characters from "
            "[A-Za-z0-9._:/+=-] (a UUID, say), or leave it empty"
        )
    return request_id
