"""Steps of an export, for a progress bar: an exporter calls `step(name)` as it starts each of its `STEPS`;
whoever wants to show them (the `headswap export` command) listens with `reporting(callback)`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

TEXT_STEPS = ("exporting", "fusing", "fp16", "checking parity", "writing")
IMAGE_STEPS = ("fetching", "exporting", "fp16", "checking parity", "writing")

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("export_progress", default=None)


def step(name: str) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(name)


@contextmanager
def reporting(callback: Callable[[str], None]) -> Iterator[None]:
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)
