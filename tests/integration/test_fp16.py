"""fp16 served for real, on the CPU: the model the Docker image and the GPU path serve, through the same
server, the same client and the same store as fp32. Both precisions are pinned (`--precision fp16`, `fp32`),
whatever `auto` would choose on this machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]


def serving(backbone_dir: Path, store: Path, log: Path, precision: str) -> ServerProcess:
    return ServerProcess(
        "--backbone",
        str(backbone_dir),
        "--store",
        str(store),
        "--precision",
        precision,
        "--warmup-rounds",
        "0",
        log_path=log,
    )


def test_fp16_on_the_cpu_matches_fp32_and_serves_its_heads(
    backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:
    from headswap.client import Client

    store = tmp_path / "store"
    texts = [t for i in INTENTS for t in banking77["train"][i][:10]]
    labels = [i for i in INTENTS for _ in range(10)]
    probes = [t for i in INTENTS for t in banking77["test"][i][:10]]
    with serving(backbone_dir, store, tmp_path / "fp32.log", "fp32") as fp32, Client(fp32.target) as client:
        reference = client.embed_full(probes)
        assert reference.backbone.precision == "fp32"
        trained = client.adapt_head("acme", texts, labels)
        assert trained.activated
        on_fp32 = client.classify("acme", probes, top_k=len(INTENTS))
    with serving(backbone_dir, store, tmp_path / "fp16.log", "fp16") as fp16, Client(fp16.target) as client:
        half = client.embed_full(probes)
        assert half.backbone.precision == "fp16"
        assert half.embeddings.dtype == np.float32 and half.embeddings.shape == reference.embeddings.shape
        cosines = np.sum(half.embeddings * reference.embeddings, axis=1)  # rows are L2-normalised
        assert float(cosines.min()) >= 0.999, sorted(cosines)[:3]
        # The head trained on fp32 embeddings answers on fp16: one fingerprint, parity 0.999 at export.
        on_fp16 = client.classify("acme", probes, top_k=len(INTENTS))
    assert {p.version for p in on_fp16} == {trained.head.version}
    agree = sum(a.label == b.label for a, b in zip(on_fp32, on_fp16, strict=True))
    assert agree >= len(probes) - 1, f"{agree} of {len(probes)} predictions agree across precisions"
    gaps = [
        abs(probabilities(a)[label] - probabilities(b)[label])
        for a, b in zip(on_fp32, on_fp16, strict=True)
        for label in INTENTS
    ]
    assert max(gaps) < 0.02, f"a probability moved by {max(gaps):.4f} between fp32 and fp16"


def probabilities(prediction: object) -> dict[str, float]:
    return {s.label: s.probability for s in prediction.labels}  # type: ignore[attr-defined]
