"""Text preprocessing: the backbone's tokenizer, unpadded (the batcher pads across requests, to the longest
item or to a shape bucket)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.protocols import Prepared
from headswap.server.input_kinds import InputLimits
from headswap.server.manifest import BackboneManifest

# A request of at most this many characters in all is tokenized on the event loop (`cheap`): about 30 µs a
# short text, less than a hop to the preprocessing pool and back, which also waits its turn for the GIL.
CHEAP_CHARS = 1024

# Real text runs 3 to 6 characters per token: cutting at 64 per token of max_length (16,384 characters for
# 256 tokens) cuts nothing the backbone would see, and bounds the tokenizer's work on a huge text.
CHARS_PER_TOKEN_BOUND = 64


# Texts of printable ASCII (and tab, newline, carriage return) only: what BERT's normalizer leaves as it is
# but for case (its control-character removal, CJK spacing and accent stripping find nothing to do there;
# the tabs and newlines it turns into spaces split words all the same).
_NOT_PLAIN = re.compile(r"[^\x20-\x7e\t\n\r]")


def plain_twin(tokenizer: Any) -> Any | None:
    """For a tokenizer whose normalizer is BERT's, a copy whose normalizer only lowercases (or does nothing,
    for a cased one): the same ids for plain ASCII texts (tested on every Banking77 and SST-2 sentence and on
    generated ones), at about 70% of the CPU (BERT's normalizer is a third of a short text's tokenizing).
    None for any other normalizer."""
    from tokenizers import Tokenizer, normalizers

    serialized = tokenizer.to_str()
    normalizer = json.loads(serialized).get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        return None
    twin = Tokenizer.from_str(serialized)
    twin.normalizer = (
        normalizers.Lowercase() if normalizer.get("lowercase", True) else normalizers.Sequence([])
    )
    return twin


def from_backbone(directory: Path, manifest: BackboneManifest, limits: InputLimits) -> TextPreprocessor:
    """The text kind's preprocessor (`input_kinds.TEXT`): the backbone directory's tokenizer."""
    return TextPreprocessor(directory / manifest.tokenizer, manifest.max_length, manifest.input_names)


def _text(item: Input) -> str:
    return item.content if isinstance(item.content, str) else ""


class TextPreprocessor:
    input_kind = "text"

    def __init__(self, tokenizer_path: Path, max_length: int, input_names: Sequence[str]) -> None:
        from tokenizers import Tokenizer

        self.max_length = max_length
        self.max_chars = max_length * CHARS_PER_TOKEN_BOUND
        self.input_names = tuple(input_names)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.no_padding()
        self.plain = plain_twin(self.tokenizer)  # for plain ASCII texts: the same ids, cheaper

    def clip(self, item: Input) -> Input:
        """The part of a text the backbone can see: cut by characters before tokenizing, so a huge text
        costs no more than a long one (and is stored no larger as a training example)."""
        text = _text(item)
        return item if len(text) <= self.max_chars else Input(text=text[: self.max_chars])

    def cheap(self, inputs: Sequence[Input]) -> bool:
        """Cheaper to tokenize where it is than to hand to a thread: a few short texts."""
        return len(inputs) <= 8 and sum(len(_text(item)) for item in inputs) <= CHEAP_CHARS

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        return self.prepare_many([inputs])[0]

    def prepare_many(self, groups: Sequence[Sequence[Input]]) -> list[list[Prepared]]:
        """Several requests' inputs in one tokenizer call: the Rust batch call releases the GIL and spreads
        the texts over every core (and skips the character offsets nothing here reads)."""
        clipped = [[self.clip(item) for item in inputs] for inputs in groups]
        encodings = self.encode([_text(item) for short in clipped for item in short])
        out: list[list[Prepared]] = []
        start = 0
        for inputs, short in zip(groups, clipped, strict=True):
            prepared = []
            for e, item, cut in zip(encodings[start : start + len(inputs)], inputs, short, strict=True):
                ids = np.asarray(e.ids, dtype=np.int64)
                prepared.append(Prepared(ids, len(ids), len(ids), len(e.overflowing) > 0 or cut is not item))
            out.append(prepared)
            start += len(inputs)
        return out

    def encode(self, texts: list[str]) -> list[Any]:
        """The tokenizer's encodings of ``texts``: plain ASCII ones through the cheaper twin (same ids)."""
        if self.plain is None:
            return self.tokenizer.encode_batch_fast(texts)
        # isascii is O(1) in CPython: it spares the scan for texts that are not ASCII at all.
        is_plain = [text.isascii() and _NOT_PLAIN.search(text) is None for text in texts]
        if all(is_plain):
            return self.plain.encode_batch_fast(texts)
        if not any(is_plain):
            return self.tokenizer.encode_batch_fast(texts)
        out: list[Any] = [None] * len(texts)
        for tokenizer, wanted in ((self.plain, True), (self.tokenizer, False)):
            where = [i for i, p in enumerate(is_plain) if p is wanted]
            for i, encoding in zip(
                where, tokenizer.encode_batch_fast([texts[i] for i in where]), strict=True
            ):
                out[i] = encoding
        return out

    def collate(
        self, items: Sequence[Prepared], shape: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        input_ids, mask = pad(items, shape)
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {name: feeds[name] for name in self.input_names}

    def placeholder(self, length: int) -> Prepared:
        ids = self.tokenizer.encode("a").ids  # [CLS] a [SEP]
        body = np.full(max(length, len(ids)), ids[1], dtype=np.int64)
        body[0], body[-1] = ids[0], ids[-1]
        return Prepared(body, len(body), len(body))

    def warm_up_batches(self, items: int) -> list[list[Input]]:
        return [
            [Input(text="warm-up")],
            [Input(text="a short sentence to warm the backbone up")] * items,
            [Input(text="a sentence of middling length, the kind most callers send, " * 4)] * items,
            [Input(text="word " * (self.max_length + 8))] * 2,
        ]


def pad(items: Sequence[Prepared], shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences padded with 0 to the longest, or to `shape` (rows, length): (ids, attention mask),
    both int64. Positions past a text's end are masked out, so they change nothing it embeds to; rows past
    the items (a bucket's spare rows) hold the first item's first token alone ([CLS]), so that no row is
    empty (an all-masked row would be a division by zero in mean pooling); their outputs are dropped."""
    longest = max(len(item.payload) for item in items)
    rows, length = shape if shape is not None else (len(items), longest)
    if rows < len(items) or length < longest:
        raise ValueError(
            f"{len(items)} items of up to {longest} tokens do not fit a ({rows}, {length}) batch"
        )
    ids = np.zeros((rows, length), dtype=np.int64)
    mask = np.zeros((rows, length), dtype=np.int64)
    for row, item in enumerate(items):
        ids[row, : len(item.payload)] = item.payload
        mask[row, : len(item.payload)] = 1
    if rows > len(items):
        ids[len(items) :, 0] = items[0].payload[0]
        mask[len(items) :, 0] = 1
    return ids, mask
