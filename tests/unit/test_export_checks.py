"""The exporter refuses to write a backbone that fails its checks, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headswap.server.export import quantize
from headswap.server.export import text as export
from headswap.server.manifest import BackboneManifest
from tests.helpers import DATA


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
    for name in ("model.onnx", "model_fp16.onnx", "model_int8.onnx", "tokenizer.json"):
        assert (backbone_dir / name).stat().st_size > 0


def test_int8_model_keeps_fused_attention_and_has_its_own_fingerprint(int8_backbone_dir: Path) -> None:
    backbone_dir = int8_backbone_dir
    manifest = json.loads((backbone_dir / "manifest.json").read_text())
    assert manifest["model_int8"] == "model_int8.onnx" and len(manifest["fingerprint_int8"]) == 64
    assert manifest["fingerprint_int8"] != manifest["fingerprint"]
    # The gate's measurement on the parity set, as recorded, with the int8 kernel family it was measured on
    # (this CPU's, when this session exported it): the margin is known per family (docs/BENCHMARKS.md).
    assert manifest["parity_mean_cosine_int8"] >= 0.99 and manifest["parity_min_cosine_int8"] >= 0.98
    assert manifest["parity_int8_cpu"] in ("avx512_vnni", "avx_vnni", "avx512", "avx2", "other"), manifest
    assert BackboneManifest.load(backbone_dir).parity_passed("int8")
    assert manifest["quantization"]["weights"] == "int8, per channel"
    counts = quantize.quantized_operator_counts(backbone_dir / "model_int8.onnx")
    assert counts["QAttention"] == 6 and "Attention" not in counts, counts  # attention stays one fused kernel
    assert counts["MatMulInteger"] == 18 - len(manifest["quantization"]["excluded"].split(","))


def test_int8_parity_on_real_sentences(int8_backbone_dir: Path) -> None:
    """Beyond the gate's own sentences: 400 real ones from Banking77 and SST-2, run in serving-like batches."""
    backbone_dir = int8_backbone_dir
    import onnxruntime as ort

    from bench.data import read_banking77, read_sst2

    rng = np.random.default_rng(0)
    banking = [t for t, _ in read_banking77(DATA, "test")]
    sst2 = read_sst2(DATA, "dev")
    texts = [banking[i] for i in rng.choice(len(banking), 200, replace=False)]
    texts += [sst2[i] for i in rng.choice(len(sst2), 200, replace=False)]
    tokenizer = export._load_tokenizer(backbone_dir / "tokenizer.json", 256)

    def runner(model: str):  # type: ignore[no-untyped-def]
        session = ort.InferenceSession(str(backbone_dir / model), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["sentence_embedding"], export._tokenize(tokenizer, batch))[0]

    fp32 = runner("model.onnx")
    reference = np.concatenate([fp32(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    parity = quantize.measure_parity(texts, reference, runner("model_int8.onnx"))
    assert parity.mean_cosine >= 0.99 and parity.min_cosine >= 0.98, parity


def test_int8_gate_refuses_a_drifting_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The naive recipe (one scale per weight matrix, everything quantised) drifts too far on short texts.
    naive = quantize.Int8Recipe(per_channel=False)
    real = export.quantize_int8
    monkeypatch.setattr(export, "quantize_int8", lambda src, dst: real(src, dst, naive))
    out = tmp_path / "backbone"
    with pytest.raises(export.ExportError, match="int8 parity failed"):
        export.export_backbone(out, precisions=("fp32", "int8"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temporary export files left behind"


def test_parity_check_thresholds() -> None:
    quantize.Int8Parity(0.995, 0.981, "ok").check()
    with pytest.raises(quantize.Int8ParityError, match=r"mean 0\.98900"):
        quantize.Int8Parity(0.989, 0.985, "a").check()
    with pytest.raises(quantize.Int8ParityError, match=r"min 0\.97000.*'thanks!'"):
        quantize.Int8Parity(0.999, 0.97, "thanks!").check()


def test_existing_backbone_needs_force(backbone_dir: Path) -> None:
    with pytest.raises(export.ExportError, match="--force"):
        export.export_backbone(backbone_dir)
