"""`headswap serve` whose backbone forward passes can be held, for tests of what happens while calls are in
flight (draining on SIGTERM, a grace period running out, health before warm-up).

    ServerProcess(..., module="tests.gated_serve", env=gate.env)

Everything is the real server with the real backbone; only each encoder is wrapped so that a forward pass
waits while the file `<HEADSWAP_TEST_GATE>/closed` exists, and appends its batch size to
`<HEADSWAP_TEST_GATE>/held` when it starts waiting. `Gate` is the test's side of it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Gate:
    """Holds the server's forward passes while closed; says how many inputs wait in held passes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.env = {"HEADSWAP_TEST_GATE": str(directory), "PYTHONPATH": str(REPO)}

    def close(self) -> None:
        (self.directory / "closed").touch()

    def open(self) -> None:
        (self.directory / "closed").unlink(missing_ok=True)

    def held(self) -> list[int]:
        """The batch sizes of the forward passes that waited at the gate, in order."""
        path = self.directory / "held"
        return [int(line) for line in path.read_text().split()] if path.exists() else []


class GatedEncoder:
    def __init__(self, inner: Any, directory: Path) -> None:
        self.inner = inner
        self.dim, self.provider, self.precision = inner.dim, inner.provider, inner.precision
        self.closed = directory / "closed"
        self.held = directory / "held"

    def run(self, feeds: Mapping[str, Any], spare_core: bool = False) -> Any:
        if self.closed.exists():
            with self.held.open("a") as log:
                log.write(f"{len(next(iter(feeds.values())))}\n")
            while self.closed.exists():
                time.sleep(0.005)
        return self.inner.run(feeds)


def main() -> int:
    from headswap.server import app

    directory = Path(os.environ["HEADSWAP_TEST_GATE"])
    load = app.load_backbones

    def gated(config: Any) -> Any:
        return [
            (name, dataclasses.replace(b, encoder=GatedEncoder(b.encoder, directory)))
            for name, b in load(config)
        ]

    app.load_backbones = gated  # type: ignore[assignment]
    from headswap.client.cli import main as cli_main

    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
