"""The exporter refuses to write a backbone that fails its checks, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headswap.server.export import text as export


def test_refuses_on_parity_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export._reference_embeddings

    def drifted(model_dir: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
        ref = real(model_dir, batch)
        rng = np.random.default_rng(0)
        return ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)

    monkeypatch.setattr(export, "_reference_embeddings", drifted)
    out = tmp_path / "backbone"
    with pytest.raises(export.ExportError, match="fp32 parity failed"):
        export.export_backbone(out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temporary export files left behind"


def test_refuses_when_attention_is_not_fused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeOptimized:
        def get_fused_operator_statistics(self) -> dict[str, int]:
            return {"SkipLayerNormalization": 12, "BiasGelu": 6, "Attention": 0}

    from onnxruntime.transformers import optimizer

    monkeypatch.setattr(optimizer, "optimize_model", lambda *a, **k: FakeOptimized())
    with pytest.raises(export.ExportError, match="Attention fused in 0 of 6 layers"):
        export.export_backbone(tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_exported_manifest(backbone_dir: Path) -> None:
    manifest = json.loads((backbone_dir / "manifest.json").read_text())
    assert manifest["embedding_dim"] == 384 and manifest["max_length"] == 256
    assert manifest["pooling"] == "mean" and manifest["normalization"] == "l2"
    assert manifest["input_kind"] == "text" and len(manifest["fingerprint"]) == 64
    fused = manifest["fused_operators"]
    assert fused["Attention"] == 6 and fused["SkipLayerNormalization"] >= 12 and fused["BiasGelu"] == 6
    assert manifest["parity_min_cosine_fp32"] >= 0.9999 and manifest["parity_min_cosine_fp16"] >= 0.999
    for name in ("model.onnx", "model_fp16.onnx", "tokenizer.json"):
        assert (backbone_dir / name).stat().st_size > 0


def test_existing_backbone_needs_force(backbone_dir: Path) -> None:
    with pytest.raises(export.ExportError, match="--force"):
        export.export_backbone(backbone_dir)
