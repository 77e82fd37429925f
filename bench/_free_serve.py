"""`headswap serve` with a free encoder: the real server, the real tokenizer, and a forward pass that costs
nothing (`python -m bench.gpu --fake-encoder`).

What is left is the pipeline itself: gRPC, protobuf, validation, admission, tokenizing, batching, heads,
replies. Its throughput is the ceiling the server can carry whatever the accelerator, so it can be improved
and verified on a CPU. The launcher changes nothing in the server but the encoder: it wraps
`load_backbones` (which `headswap.server.app` calls) and swaps each backbone's encoder for `FreeEncoder`,
keeping its dimension, provider-independent precision and fingerprint. Being outside the package, it runs the
same way against an older checkout of the server (bench.gpu's baseline, put first on `sys.path`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


class FreeEncoder:
    """Deterministic unit vectors looked up by a token checksum: microseconds per batch of any size."""

    provider = "FreeExecutionProvider"

    def __init__(self, dim: int, precision: str = "fp32", table_rows: int = 4096) -> None:
        self.dim = dim
        self.precision = precision
        table = np.random.default_rng(0).standard_normal((table_rows, dim)).astype(np.float32)
        self.table = table / np.linalg.norm(table, axis=1, keepdims=True)

    def run(self, feeds: Mapping[str, np.ndarray], spare_core: bool = False) -> np.ndarray:
        first = next(iter(feeds.values()))
        rows = first.reshape(len(first), -1)
        keys = rows[:, : min(8, rows.shape[1])].sum(axis=1).astype(np.int64) % len(self.table)
        return self.table[keys]


def free(loaded: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out = []
    for name, backbone in loaded:
        encoder = FreeEncoder(backbone.encoder.dim, backbone.encoder.precision)
        out.append((name, dataclasses.replace(backbone, encoder=encoder)))
    return out


def main() -> None:
    import headswap.server.app as app

    original = app.load_backbones

    def load_backbones(config: Any) -> list[tuple[str, Any]]:
        return free(original(config))

    app.load_backbones = load_backbones  # type: ignore[assignment]
    from headswap.client.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
