"""The int8 backbone end to end: served on request, its own fingerprint, heads bound to their precision."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import Client, HeadswapError
from headswap.server.inference.precision import has_vnni, read_cpu_flags
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "pin_blocked"]


def start(backbone_dir: Path, store: Path, log: Path, *flags: str) -> ServerProcess:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", *flags, log_path=log
    )
    proc.wait_serving()
    return proc


def examples(data: Data, split: str, per: int) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in INTENTS for t in data[split][i][:per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


@pytest.fixture(scope="module")
def int8_server(backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("int8")
    proc = start(backbone_dir, work / "store", work / "server.log", "--precision", "int8")
    proc.store = work / "store"
    try:
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()


def test_int8_embeddings_stay_close_to_fp32(
    int8_server: ServerProcess, backbone_dir: Path, banking77: Data
) -> None:
    manifest = json.loads((backbone_dir / "manifest.json").read_text())
    texts = [t for i in INTENTS for t in banking77["test"][i][:20]] + ["thanks!", "cool ?", "no"]
    with Client(int8_server.target) as client:
        got = client.embed_full(texts)
    assert got.backbone.precision == "int8" and got.backbone.fingerprint == manifest["fingerprint_int8"]
    assert got.backbone.fingerprint != manifest["fingerprint"]
    import onnxruntime as ort

    from headswap.server.export.text import _load_tokenizer, _tokenize

    tokenizer = _load_tokenizer(backbone_dir / "tokenizer.json", 256)
    session = ort.InferenceSession(str(backbone_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (reference,) = session.run(["sentence_embedding"], _tokenize(tokenizer, texts))
    cosine = np.sum(got.embeddings * reference, axis=1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, cosine
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, atol=1e-5)


def test_int8_head_quality(int8_server: ServerProcess, banking77: Data) -> None:
    texts, labels = examples(banking77, "train", 15)
    test_texts, test_labels = examples(banking77, "test", 20)
    with Client(int8_server.target) as client:
        result = client.adapt_head("int8-quality", texts, labels, replace=True)
        predictions = client.classify("int8-quality", test_texts)
    assert result.activated
    accuracy = np.mean([p.label == y for p, y in zip(predictions, test_labels, strict=True)])
    assert accuracy > 0.85, accuracy


def test_head_trained_on_fp32_is_refused_on_int8(backbone_dir: Path, banking77: Data, tmp_path: Path) -> None:
    """The same store served first in fp32, then in int8: the fp32 head must not run on int8 embeddings."""
    store = tmp_path / "store"
    fp32 = start(backbone_dir, store, tmp_path / "fp32.log", "--precision", "fp32")
    try:
        with Client(fp32.target) as client:
            trained = client.adapt_head("acme", *examples(banking77, "train", 8), replace=True)
            assert trained.activated
    finally:
        assert fp32.terminate() == 0, fp32.log()
    int8 = start(backbone_dir, store, tmp_path / "int8.log", "--precision", "int8")
    try:
        with Client(int8.target) as client:
            with pytest.raises(HeadswapError) as info:
                client.classify("acme", ["where is my new card?"])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "backbone" in info.value.details and "AdaptHead" in info.value.details
            # Retraining on int8 (the examples are embedded again by the int8 backbone) fixes it.
            retrained = client.adapt_head("acme", *examples(banking77, "train", 8), replace=True)
            assert retrained.version == trained.version + 1
            assert client.classify("acme", ["where is my new card?"])[0].label == "card_arrival"
    finally:
        assert int8.terminate() == 0, int8.log()


def test_auto_precision_follows_this_cpu(backbone_dir: Path, tmp_path: Path) -> None:
    """auto serves int8 on a CPU with VNNI, fp32 on one without; the choice is logged and reported."""
    expected = "int8" if has_vnni(read_cpu_flags()) else "fp32"
    proc = start(backbone_dir, tmp_path / "store", tmp_path / "auto.log")
    try:
        with Client(proc.target) as client:
            info = client.embed_full(["hello"]).backbone
        assert info.precision == expected, proc.log()
        assert f"precision auto: {expected}" in proc.log()
    finally:
        assert proc.terminate() == 0, proc.log()
