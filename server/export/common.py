"""What every export shares: its error, its report, the parity measure and the atomic move into place."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headswap.server.manifest import BackboneManifest


class ExportError(RuntimeError):
    """The export could not produce a backbone that passes its checks; nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    out: Path
    manifest: BackboneManifest
    seconds: float
    steps: tuple[tuple[str, float], ...] = ()  # (what, seconds), in order

    def summary(self) -> str:
        """One line: what was made, how long each part took, and the parity it passed."""
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.steps)
        parts = f" ({parts})" if parts else ""
        m = self.manifest
        parity = f"parity with PyTorch min cosine fp32 {m.parity_min_cosine_fp32:.6f}"
        if m.model_fp16:
            parity += f", fp16 {m.parity_min_cosine_fp16:.6f}"
        if m.model_int8:
            parity += f", int8 {m.parity_min_cosine_int8:.5f}"
        return f"exported {m.name} in {self.seconds:.1f}s{parts}; {parity}"


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def replace_dir(new: Path, target: Path) -> None:
    """Move a finished directory into place; an old one is only removed once the new one is there. Readable
    by everyone (a temporary directory is made private): the server may run as another user than the export,
    as in the container image."""
    new.chmod(0o755)
    for path in new.iterdir():
        path.chmod(0o644)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{int(time.time() * 1000)}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
