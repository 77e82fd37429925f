"""The serving core loads without PyTorch: torch is for training and applying heads, not for the edge,
the batcher, the store or the domain types (issue 25)."""

from __future__ import annotations

import subprocess
import sys

import headswap.adapters as adapters


def test_serving_core_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import headswap.server.rpc, headswap.server.inference, headswap.server.store, headswap.server.domain\n"
        "import headswap.server.inference.batcher, headswap.server.rpc.codec, headswap.server.store.base\n"
        "import headswap.client\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", "torch was imported by the serving core"


def test_every_lazy_name_resolves() -> None:
    """Each name `headswap.adapters` promises comes from the module it names (a typo fails here, not in
    production at first use)."""
    for name in adapters.__all__:
        assert getattr(adapters, name) is not None, name
    assert sorted(adapters.__all__) == sorted(adapters._WHERE)
