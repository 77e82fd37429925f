"""Parsers of setting values: each takes the setting's name (for its message) and the raw string, and
returns the value or raises ValueError saying what is wrong with it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Parser = Callable[[str, str], Any]


def _bad(message: str) -> ValueError:
    return ValueError(f"bad configuration: {message}")


def integer(low: int | None = None, high: int | None = None) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _bad(f"{name} must be a number, not {raw!r}") from None
        if low is not None and high is not None and not low <= value <= high:
            raise _bad(f"{name} {value} is outside {low}..{high}")
        if low is not None and value < low:
            raise _bad(f"{name} must be at least {low}, not {value}")
        return value

    return parse


def number(low: float = 0.0, high: float | None = None) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _bad(f"{name} must be a number, not {raw!r}") from None
        if not value >= low:
            raise _bad(f"{name} must be at least {low}, not {value}")
        if high is not None and not value <= high:
            raise _bad(f"{name} must be at most {high}, not {value}")
        return value

    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad(f"{name} must be one of {', '.join(_TRUE + _FALSE)}, not {raw!r}")


def choice(*allowed: str, upper: bool = False) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in allowed:
            raise _bad(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {raw!r}")
        return value

    return parse


_BACKBONE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def backbone_spec(name: str, raw: str) -> tuple[str, Path]:
    """`DIR` or `NAME=DIR`."""
    label, sep, directory = raw.partition("=")
    if not sep:
        return "", Path(raw).expanduser()
    if not _BACKBONE_NAME.fullmatch(label):
        raise _bad(f"{name} {raw!r}: a backbone's name is 1 to 32 of a-z 0-9 _ - (NAME=DIR)")
    return label, Path(directory).expanduser()


def path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def text(name: str, raw: str) -> str:
    return raw
