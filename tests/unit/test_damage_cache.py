"""Issue 23, item 3: the stored embedding cache is checked, row by row. Each row carries the sha256 of its key
and its vector: 16 garbled bytes, rows permuted (finite unit vectors, each under another text's key) or a file
written before the checksums are dropped, counted and embedded again, never INTERNAL, never trained on; the
next save is sound. Real files of a real LocalStore; the server runs in process on the fake encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from headswap.client import AsyncClient
from headswap.server.config import ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.local import LocalStore
from headswap.server.testing import in_process

TEXTS = [f"{c} word{i} more{i % 3}" for c in ("red", "blue") for i in range(6)]
LABELS = [t.split()[0] for t in TEXTS]


def cache_file(root: Path) -> Path:
    return next((root / "tenants" / "t" / "embeddings").glob("*.safetensors"))


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(range(0xF0, 0x100))  # 16 bytes: NaNs and huge floats among them
    path.write_bytes(bytes(data))


def permute(path: Path) -> None:
    tensors = load(path.read_bytes())
    tensors["vectors"] = np.roll(tensors["vectors"], 1, axis=0)  # every row under another text's key
    path.write_bytes(save(tensors))


def unchecked(path: Path) -> None:
    tensors = load(path.read_bytes())
    path.write_bytes(save({"keys": tensors["keys"], "vectors": tensors["vectors"]}))


async def adapt(root: Path, home: Path) -> tuple[int, int, float]:
    """One AdaptHead of the same texts on a fresh server (its memory cache empty): (embedded, hits, damaged)."""
    config = ServerConfig(warmup_rounds=0, home=home)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            result = await client.adapt_head("t", TEXTS, LABELS, replace=True, validation_fraction=0)
            damaged = running.server.metrics.registry.get_sample_value(
                "headswap_embedding_cache_damaged_total"
            )
            return result.embedded, result.cache_hits, damaged or 0.0


@pytest.mark.parametrize("damage", [garble, permute, unchecked])
async def test_a_damaged_cache_is_dropped_counted_and_embedded_again(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    root = tmp_path / "store"
    assert (await adapt(root, tmp_path))[:2] == (len(TEXTS), 0)
    assert await adapt(root, tmp_path) == (0, len(TEXTS), 0.0)  # the stored cache, sound
    damage(cache_file(root))
    embedded, hits, damaged = await adapt(root, tmp_path)
    assert embedded > 0 and damaged > 0 and embedded + hits == len(TEXTS)
    if damage is permute:
        assert embedded == len(TEXTS)  # not one moved row trusted
    assert await adapt(root, tmp_path) == (0, len(TEXTS), 0.0)  # saved back sound
