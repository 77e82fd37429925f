"""Checks on caller input, made at the edge before any work is done."""

from __future__ import annotations

import re
from collections.abc import Sequence

from headswap.server.errors import InvalidArgument

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_texts(texts: Sequence[str], max_inputs: int, what: str = "inputs") -> None:
    if not texts:
        raise InvalidArgument(f"{what} is empty: send at least one input")
    if len(texts) > max_inputs:
        raise InvalidArgument(
            f"{what} has {len(texts)} items, more than this server's maximum of {max_inputs} per call: "
            "split the batch"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"{what}[{i}] is empty or only white space: every input needs some text")


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        shown = tenant if len(tenant) <= 80 else tenant[:77] + "..."
        raise InvalidArgument(
            f"tenant {shown!r} is not a valid name: use 1 to 64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return tenant
