"""A server holds numpy's BLAS to one thread: OpenBLAS's own pool would spin on the cores the forward pass
runs on (server/pools.py, `limit_blas_threads`)."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from headswap.server.inference.fake import fake_backbone
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import in_process


def blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]


async def test_a_server_holds_numpy_blas_to_one_thread() -> None:
    assert blas_threads(), "numpy's BLAS is not visible to threadpoolctl"
    threadpool_limits(limits=2, user_api="blas")  # as a fresh process on 2 cores starts
    assert set(blas_threads()) == {2}
    async with in_process(backbone=fake_backbone(), store=MemoryStore()):
        assert set(blas_threads()) == {1}
