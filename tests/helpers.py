"""Test helpers: where the repository and the shared data are; servers come from headswap.server.testing."""

from __future__ import annotations

import os
from pathlib import Path

from headswap.server.testing import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSWAP_DATA", REPO.parent / "shared" / "data"))

__all__ = ["DATA", "REPO", "ServerProcess", "free_port"]
