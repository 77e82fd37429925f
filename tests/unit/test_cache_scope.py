"""The embedding cache is no side channel between tenants (issue 23, item 4): by default a tenant's AdaptHead
counts as hits only vectors it embedded itself, so tenant B cannot learn whether tenant A ever trained on a
text; `--cache-scope shared` lets tenants of one organisation reuse each other's vectors. In process, through
real gRPC, on the fake encoder."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from headswap.client import AsyncClient
from headswap.server.cache import EmbeddingCache
from headswap.server.config import ServerConfig, StoreConfig
from headswap.server.domain import Input
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.local import LocalStore
from headswap.server.testing import in_process

SECRET = ["refund order 4471 for J. Smith", "close account of A. Jones", "wire 900 to B. Brown"]
TEXTS = [*SECRET, "hello there", "good morning", "see you soon"]
LABELS = ["money", "money", "money", "greeting", "greeting", "greeting"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return parser.parse_args(argv)


async def hits_of_b(tmp_path: Path, scope: str) -> tuple[int, int]:
    config = ServerConfig(warmup_rounds=0, home=tmp_path, store=StoreConfig(cache_scope=scope))
    store = LocalStore(tmp_path / f"store-{scope}")
    async with in_process(config, backbone=fake_backbone(), store=store) as s:
        async with AsyncClient(s.target, retries=0) as client:
            a = await client.adapt_head("a", TEXTS, LABELS, validation_fraction=0)
            assert a.cache_hits == 0 and a.embedded == len(TEXTS)
            b = await client.adapt_head("b", TEXTS, LABELS, validation_fraction=0)
            again = await client.adapt_head("b", TEXTS, LABELS, validation_fraction=0)
            assert again.cache_hits == 2 * len(TEXTS) and again.embedded == 0  # stored and new: its own
            return b.cache_hits, b.embedded


async def test_by_default_a_tenant_sees_no_hit_of_another_tenants_texts(tmp_path: Path) -> None:
    assert await hits_of_b(tmp_path, "tenant") == (0, len(TEXTS))


async def test_a_shared_cache_reuses_other_tenants_vectors(tmp_path: Path) -> None:
    hits, embedded = await hits_of_b(tmp_path, "shared")
    assert hits == len(TEXTS) and embedded == 0


def test_the_scope_is_a_setting_that_defaults_to_tenant() -> None:
    assert ServerConfig.from_sources(parse([]), environ={}).store.cache_scope == "tenant"
    config = ServerConfig.from_sources(parse(["--cache-scope", "shared"]), environ={})
    assert config.store.cache_scope == "shared"
    env = {"HEADSWAP_CACHE_SCOPE": "shared"}
    assert ServerConfig.from_sources(parse([]), environ=env).store.cache_scope == "shared"
    with pytest.raises(ValueError, match="cache scope must be"):
        ServerConfig.from_sources(parse([]), environ={"HEADSWAP_CACHE_SCOPE": "everyone"})
    assert replace(StoreConfig(), cache_scope="shared").cache_scope == "shared"


def test_a_tenant_scoped_cache_keeps_tenants_apart_and_forgets_a_deleted_one() -> None:
    cache = EmbeddingCache(capacity=10)
    a = Input(text="a").content_key()
    cache.put_many("fp", {a: np.ones(2, np.float32)}, tenant="t1")
    assert cache.get_many("fp", [a], tenant="t2") == {}
    assert set(cache.get_many("fp", [a], tenant="t1")) == {a}
    assert cache.evict_tenant("t1") == 1 and len(cache) == 0
