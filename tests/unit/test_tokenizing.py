"""The text preprocessor's cheaper tokenizer for plain ASCII texts gives exactly the ids of the backbone's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headswap.server.domain import Input
from headswap.server.inference.text import TextPreprocessor, plain_twin
from tests.helpers import DATA

PLAIN = st.text(
    alphabet=st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]), max_size=600
)
# Texts BERT's normalizer changes beyond case: accents, CJK, control characters, odd spaces, replacement char.
NOT_PLAIN = st.sampled_from(
    [
        "Café crème",
        "naïve résumé",
        "你好 world",
        "bell\x07here",
        "nul\x00byte",
        "no\xa0break",
        "ＦＵＬＬ",
        "�?",
        "👍 ok",
    ]
)


@pytest.fixture(scope="module")
def pre(backbone_dir: Path) -> TextPreprocessor:
    return TextPreprocessor(
        backbone_dir / "tokenizer.json", 256, ("input_ids", "attention_mask", "token_type_ids")
    )


def _full(pre: TextPreprocessor, texts: list[str]) -> list[tuple[list[int], int]]:
    return [(e.ids, len(e.overflowing)) for e in pre.tokenizer.encode_batch_fast(texts)]


def _ours(pre: TextPreprocessor, texts: list[str]) -> list[tuple[list[int], int]]:
    return [(e.ids, len(e.overflowing)) for e in pre.encode(texts)]


class Recorder:
    """The twin, counting the texts it is given."""

    def __init__(self, twin: Any) -> None:
        self.twin, self.texts = twin, 0

    def encode_batch_fast(self, texts: list[str]) -> Any:
        self.texts += len(texts)
        return self.twin.encode_batch_fast(texts)


def test_the_backbone_tokenizer_has_a_cheaper_twin(pre: TextPreprocessor) -> None:
    assert pre.plain is not None
    assert type(pre.plain.normalizer).__name__ == "Lowercase"  # BERT's normalizer is the part it leaves out
    recorder = Recorder(pre.plain)
    pre.plain = recorder
    try:
        texts = ["plain text, with punctuation!", "Café", "tab\tand\nnewline", "你好"]
        assert _ours(pre, texts) == _full(pre, texts)  # in the callers' order
        assert recorder.texts == 2  # the plain ones only
    finally:
        pre.plain = recorder.twin


@settings(max_examples=300, deadline=None)
@given(text=PLAIN)
def test_plain_texts_get_the_same_ids_and_truncation(pre: TextPreprocessor, text: str) -> None:
    assert _ours(pre, [text]) == _full(pre, [text])


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.one_of(PLAIN, NOT_PLAIN), min_size=1, max_size=12))
def test_mixed_batches_keep_their_order_and_ids(pre: TextPreprocessor, texts: list[str]) -> None:
    assert _ours(pre, texts) == _full(pre, texts)
    prepared = pre.prepare([Input(text=t) for t in texts])
    assert [item.payload.tolist() for item in prepared] == [ids for ids, _ in _full(pre, texts)]


def test_every_banking77_and_sst2_sentence_gets_the_same_ids(pre: TextPreprocessor) -> None:
    texts = []
    for path in sorted((DATA / "banking77").glob("*.csv")) + sorted((DATA / "sst2").glob("*.txt")):
        texts += path.read_text(encoding="utf-8").splitlines()
    assert len(texts) > 10_000
    assert _ours(pre, texts) == _full(pre, texts)


def test_other_normalizers_have_no_twin() -> None:
    from tokenizers import Tokenizer, models, normalizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFKC()
    assert plain_twin(tokenizer) is None
