from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DATA, REPO, ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    """The real exported all-MiniLM-L6-v2, exported once and kept in .cache/ between runs."""
    from headswap.server.export.text import export_backbone

    path = Path(os.environ.get("HEADSWAP_TEST_BACKBONE", REPO / ".cache" / "backbone"))
    manifest = path / "manifest.json"
    # A backbone exported before the int8 model existed is exported again (the tests need all three models).
    if not manifest.exists() or not json.loads(manifest.read_text()).get("model_int8"):
        export_backbone(path, force=True)
    return path


@pytest.fixture(scope="session")
def banking77() -> dict[str, dict[str, list[str]]]:
    """Banking77 from ../shared/data: {"train"|"test": {intent: [texts]}}."""
    import csv

    out: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        path = DATA / "banking77" / f"{split}.csv"
        assert path.exists(), f"{path} not found: these tests need ../shared/data (or HEADSWAP_DATA)"
        by_label: dict[str, list[str]] = {}
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                by_label.setdefault(row["category"], []).append(row["text"])
        out[split] = by_label
    return out


@pytest.fixture(scope="session")
def server(backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the session, with small limits so that the limit tests are cheap."""
    work = tmp_path_factory.mktemp("server")
    proc = ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(work / "store"),
        "--max-batch-inputs",
        "512",
        "--max-message-bytes",
        str(512 * 1024),
        # fp32 on purpose, whatever this CPU is: these tests hold the server to sentence-transformers' fp32
        # embeddings (cosine >= 0.9999) and to fp32 head accuracy; int8 has its own tests (test_int8.py).
        "--precision",
        "fp32",
        log_path=work / "server.log",
    )
    proc.store = work / "store"
    try:
        proc.wait_serving()
        yield proc
    finally:
        rc = proc.terminate()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{proc.log()}"
