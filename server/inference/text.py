"""Text preprocessing: the backbone's tokenizer, unpadded (the batcher pads across requests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.protocols import Prepared

# Real text runs 3 to 6 characters per token: cutting at 64 per token of max_length (16,384 characters for
# 256 tokens) cuts nothing the backbone would see, and bounds the tokenizer's work on a huge text.
CHARS_PER_TOKEN_BOUND = 64


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

    def clip(self, item: Input) -> Input:
        """The part of a text the backbone can see: cut by characters before tokenizing, so a huge text
        costs no more than a long one (and is stored no larger as a training example)."""
        text = item.text or ""
        return item if len(text) <= self.max_chars else Input(text=text[: self.max_chars])

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        clipped = [self.clip(item) for item in inputs]
        # The Rust batch API releases the GIL and tokenizes on its own threads.
        encodings = self.tokenizer.encode_batch([item.text or "" for item in clipped])
        return [
            Prepared(
                payload=ids,
                cost=len(ids),
                group_key=len(ids),
                truncated=len(e.overflowing) > 0 or short is not item,
            )
            for e, item, short in zip(encodings, inputs, clipped, strict=True)
            for ids in (np.asarray(e.ids, dtype=np.int64),)
        ]

    def collate(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        input_ids, mask = pad(items)
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {name: feeds[name] for name in self.input_names}

    def warm_up_batches(self, items: int) -> list[list[Input]]:
        return [
            [Input(text="warm-up")],
            [Input(text="a short sentence to warm the backbone up")] * items,
            [Input(text="a sentence of middling length, the kind most callers send, " * 4)] * items,
            [Input(text="word " * (self.max_length + 8))] * 2,
        ]


def pad(items: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences padded with 0 to the longest: (ids, attention mask), both int64 (n, longest)."""
    length = max(len(item.payload) for item in items)
    ids = np.zeros((len(items), length), dtype=np.int64)
    mask = np.zeros((len(items), length), dtype=np.int64)
    for row, item in enumerate(items):
        ids[row, : len(item.payload)] = item.payload
        mask[row, : len(item.payload)] = 1
    return ids, mask
