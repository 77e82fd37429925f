"""Where a request's inputs are prepared: on the event loop or in the preprocessing pool."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from headswap.server.domain import Input
from headswap.server.inference.preparing import Preparer
from headswap.server.inference.text import TextPreprocessor


@pytest.fixture(scope="module")
def pre(backbone_dir: Path) -> TextPreprocessor:
    return TextPreprocessor(
        backbone_dir / "tokenizer.json", 256, ("input_ids", "attention_mask", "token_type_ids")
    )


async def test_a_cheap_request_for_flash_tokenizer_does_not_wait_for_a_busy_pool(
    pre: TextPreprocessor,
) -> None:
    # Where flash-tokenizer has no wheel (test_tokenizing checks it is installed where it has), a cheap
    # request under load goes to the pool like any other: that is what runs there.
    inline = pre.flash is not None
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(gate.wait)  # the pool's one thread is busy until the gate opens
    preparer = Preparer(pre, pool, workers=1)
    try:
        big = asyncio.create_task(preparer.prepare([Input(text="word " * 400)]))  # not cheap: to the pool
        await asyncio.sleep(0.05)
        assert not big.done()
        # Cheap and plain: tokenized on the loop at once, though the pool is busy.
        plain = asyncio.create_task(preparer.prepare([Input(text="hello there")]))
        await asyncio.sleep(0.05)
        assert plain.done() is inline
        # Cheap, but not for flash-tokenizer: it waits its turn in the pool, behind the big one.
        for text in ("Café", "a [CLS] b"):
            assert pre.prepare_inline([Input(text=text)]) is None
        accented = asyncio.create_task(preparer.prepare([Input(text="Café")]))
        await asyncio.sleep(0.05)
        assert not accented.done()
        gate.set()
        [hello] = await asyncio.wait_for(plain, 5.0)
        assert hello.payload.tolist() == pre.tokenizer.encode("hello there").ids
        [cafe] = await asyncio.wait_for(accented, 5.0)
        assert cafe.payload.tolist() == pre.tokenizer.encode("Café").ids
        [long] = await asyncio.wait_for(big, 5.0)
        assert long.truncated and len(long.payload) == 256
    finally:
        gate.set()
        pool.shutdown(wait=True)


def test_only_cheap_requests_of_texts_for_flash_tokenizer_are_prepared_inline(pre: TextPreprocessor) -> None:
    def inline(inputs: list[Input]) -> bool:
        prepared = pre.prepare_inline(inputs)
        if prepared is None:
            return False
        expected = pre.prepare(inputs)  # the same items as the pool would make
        assert [(p.payload.tolist(), p.cost, p.truncated) for p in prepared] == [
            (p.payload.tolist(), p.cost, p.truncated) for p in expected
        ]
        return True

    if pre.flash is None:
        assert not inline([Input(text="hello")])
        return
    assert inline([Input(text="hello")])
    assert inline([Input(text="a short one")] * 8)
    assert not inline([Input(text="a short one")] * 9)  # not cheap: too many
    assert not inline([Input(text="x " * 600)])  # not cheap: too long
    assert not inline([Input(text="hello"), Input(text="naïve")])
    assert not inline([Input(text="a [CLS] b")])  # flash-tokenizer is not fit for it
    assert inline([Input(text="w " * 400)])  # 400 words: truncated at the limit, as by the pool
    pre.flash, flash = None, pre.flash
    try:
        assert not inline([Input(text="hello")])
    finally:
        pre.flash = flash
