"""The text preprocessor's cheaper tokenizers for plain ASCII texts (flash-tokenizer where it is installed and
fit for the text, else a twin of the backbone's tokenizer without BERT's normalizer) give exactly the ids of
the backbone's own."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headswap.server.domain import Input
from headswap.server.inference.text import TextPreprocessor, flash_twin, plain_twin
from tests.helpers import DATA

PLAIN = st.text(
    alphabet=st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]), max_size=600
)
# Plain texts flash-tokenizer is not fit for (`flash_fit`): words past WordPiece's 100 characters, and the
# texts of added tokens, which the backbone's tokenizer keeps whole (in any case: "[cls]" is split by both).
UNFIT = st.sampled_from(
    ["x" * 101, "a" * 250, "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "[cls]", "[Mask]"]
)
NEAR_UNFIT = st.sampled_from(["x" * 100, "y" * 99, "[CLS", "CLS]", "[ CLS ]", "[", "]", "##ing", "un##able"])
WITH_UNFIT = st.lists(st.one_of(PLAIN.map(lambda t: t[:40]), UNFIT, NEAR_UNFIT), min_size=1, max_size=8).map(
    lambda parts: " ".join(parts) if len(parts) % 2 else "".join(parts)
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
    return [(ids, int(truncated)) for ids, truncated in pre.encode(texts)]


class Recorder:
    """The twin, counting the texts it is given."""

    def __init__(self, twin: Any) -> None:
        self.twin, self.texts = twin, 0

    def encode_batch_fast(self, texts: list[str]) -> Any:
        self.texts += len(texts)
        return self.twin.encode_batch_fast(texts)


class FlashRecorder:
    """flash-tokenizer's encode, recording the texts it is given."""

    def __init__(self, flash: Any) -> None:
        self.flash, self.texts = flash, list[str]()

    def __call__(self, texts: list[str]) -> Any:
        self.texts += texts
        return self.flash(texts)


def test_flash_tokenizer_is_installed_where_it_has_wheels(pre: TextPreprocessor) -> None:
    """The server extra installs it on Linux x86-64 (pyproject.toml), where CI runs: its tests below must not
    pass by finding it absent."""
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert pre.flash is not None


def test_each_text_goes_to_the_cheapest_tokenizer_fit_for_it(pre: TextPreprocessor) -> None:
    assert pre.plain is not None
    assert type(pre.plain.normalizer).__name__ == "Lowercase"  # BERT's normalizer is the part it leaves out
    recorder, flash = Recorder(pre.plain), FlashRecorder(pre.flash) if pre.flash else None
    pre.plain, pre.flash = recorder, flash
    try:
        texts = ["plain text, with punctuation!", "Café", "tab\tand\nnewline", "你好", "x" * 101, "a [CLS] b"]
        assert _ours(pre, texts) == _full(pre, texts)  # in the callers' order
        if flash is None:
            assert recorder.texts == 4  # the plain ones
        else:
            assert flash.texts == ["plain text, with punctuation!", "tab\tand\nnewline"]
            assert recorder.texts == 2  # the plain ones flash-tokenizer is not fit for
    finally:
        pre.plain, pre.flash = recorder.twin, flash.flash if flash else None


@settings(max_examples=300, deadline=None)
@given(text=WITH_UNFIT)
def test_plain_texts_flash_is_unfit_for_or_nearly_get_the_same_ids(pre: TextPreprocessor, text: str) -> None:
    assert _ours(pre, [text]) == _full(pre, [text])


def test_truncation_at_the_limit_and_one_past_it(pre: TextPreprocessor) -> None:
    """254 word pieces fill 256 ids with [CLS] and [SEP]: not truncated; 255 are."""
    for words, truncated in ((253, 0), (254, 0), (255, 1), (400, 1)):
        [(ids, cut)] = _ours(pre, ["ok " * words])
        assert (len(ids), cut) == (min(words + 2, 256), truncated)
        assert [(ids, cut)] == _full(pre, ["ok " * words])


def test_a_flash_tokenizer_that_disagrees_on_the_probes_is_not_used(
    pre: TextPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        import flash_tokenizer._core as flash
    except ImportError:  # no wheel for this platform: none is used, and the Rust tokenizer does every text
        assert flash_twin(pre.tokenizer, 256) is None and pre.flash is None
        return

    class Shifted(flash.FlashBertTokenizer):  # type: ignore[misc, name-defined]
        def batch_encode(self, *args: Any) -> list[list[int]]:
            return [[i + 1 for i in ids] for ids in super().batch_encode(*args)]

    assert flash_twin(pre.tokenizer, 256) is not None
    monkeypatch.setattr(flash, "FlashBertTokenizer", Shifted)
    assert flash_twin(pre.tokenizer, 256) is None


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
