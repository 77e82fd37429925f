"""The wire contract: generated code is current and `buf lint` is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

GENERATED = REPO / "proto" / "headswap" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "protoc produced nothing"
    for rel in fresh:
        committed = REPO / "proto" / rel
        assert committed.exists(), f"{committed} missing: run `python scripts/gen_proto.py`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{committed} is stale: run `python scripts/gen_proto.py` and commit the result"
        )


def test_buf_lint_clean() -> None:
    buf = shutil.which("buf")
    assert buf, "buf not installed (PyPI buf-bin, in the dev extra)"
    out = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_client_imports_without_server_dependencies() -> None:
    code = (
        "import sys, headswap.client;"
        "bad = [m for m in ('torch', 'onnxruntime', 'tokenizers', 'prometheus_client') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
