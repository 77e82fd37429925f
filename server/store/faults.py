"""Test-only: named crash points for the crash-consistency tests. It ships inside the package because the
crash has to happen inside a real server process (tests/integration start one with `testing.py`), in the
middle of a store's commit, where no test code runs; nothing else uses it.

`HEADSWAP_TEST_CRASH_AT=<name>` makes the process exit at once (no cleanup, like SIGKILL) when a commit
reaches that point, so a test can stop a commit at each of its steps on purpose rather than by timing luck.
Unset (always, outside those tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os

POINTS = ("version-written", "examples-written", "state-written")


def crash_point(name: str) -> None:
    if os.environ.get("HEADSWAP_TEST_CRASH_AT") == name:
        os._exit(137)
