"""Text preprocessing: the backbone's tokenizer, unpadded (the batcher pads across requests, to the longest
item or to a shape bucket)."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.protocols import Prepared
from headswap.server.input_kinds import InputLimits
from headswap.server.manifest import BackboneManifest

log = logging.getLogger(__name__)

# A request of at most this many characters in all is tokenized on the event loop (`cheap`): 5 to 30 µs a
# short text, less than a hop to the preprocessing pool and back, which also waits its turn for the GIL.
CHEAP_CHARS = 1024

# Real text runs 3 to 6 characters per token: cutting at 64 per token of max_length (16,384 characters for
# 256 tokens) cuts nothing the backbone would see, and bounds the tokenizer's work on a huge text.
CHARS_PER_TOKEN_BOUND = 64


# Texts of printable ASCII (and tab, newline, carriage return) only: what BERT's normalizer leaves as it is
# but for case (its control-character removal, CJK spacing and accent stripping find nothing to do there;
# the tabs and newlines it turns into spaces split words all the same).
_NOT_PLAIN = re.compile(r"[^\x20-\x7e\t\n\r]")

# Probes the flash tokenizer must tokenize exactly as the backbone's own before it is used (`flash_twin`):
# punctuation, digits, subwords, a word at WordPiece's length limit, truncation.
_FLASH_PROBES = (
    "Hello, world!",
    "I can't activate my card: it's been 3 days... why?",
    "tab\tand\nnewline\r and  double  spaces",
    "unaffable re-use e-mail x2 $100.00 #1 @home (ok) [sic] {a} <b> ~c~ `d` ^e^ |f| \\g\\ _h_ *i* +j= ;k:",
    "x" * 100,
    "word " * 300,
)


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


def _is_bert_wordpiece(spec: dict[str, Any]) -> bool:
    """BERT's own pipeline, which the flash tokenizer implements: its normalizer and pre-tokenizer, WordPiece
    with "##" and [UNK], and [CLS] text [SEP] around a single text."""
    model = spec.get("model") or {}
    post = spec.get("post_processor") or {}
    single = [next(iter(part.values())).get("id") for part in post.get("single", [])]
    return (
        (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
        and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
        and model.get("type") == "WordPiece"
        and model.get("unk_token") == "[UNK]"
        and model.get("continuing_subword_prefix") == "##"
        and (post.get("type") == "BertProcessing" or single == ["[CLS]", "A", "[SEP]"])
    )


def flash_twin(tokenizer: Any, max_length: int) -> Callable[[list[str]], list[tuple[list[int], bool]]] | None:
    """For a BERT WordPiece tokenizer, the same tokenizing of plain texts by flash-tokenizer (C++, about a
    sixth of the Rust tokenizer's CPU a short text; it holds the GIL while it runs): a function from texts
    to (ids, truncated) pairs, which `TextPreprocessor` calls only for the texts `flash_fit` admits. None
    where flash-tokenizer is not installed (wheels for Linux x86-64 and Windows only), for any other
    tokenizer, or when it does not give the backbone tokenizer's ids on a set of probes (`_FLASH_PROBES`)."""
    try:
        from flash_tokenizer._core import FlashBertTokenizer
    except ImportError:
        return None
    spec = json.loads(tokenizer.to_str())
    if not _is_bert_wordpiece(spec):
        return None
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or any(
        not t or t.split() != [t] for t in tokens
    ):
        return None  # flash-tokenizer reads a vocab.txt: one token a line, the line number its id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
        fast = FlashBertTokenizer(
            str(path),
            spec["normalizer"].get("lowercase", True),
            max_length + 1,  # one past the limit: a text longer than the limit comes out one id longer
            spec["normalizer"].get("handle_chinese_chars", True),
        )

    def encode(texts: list[str]) -> list[tuple[list[int], bool]]:
        out = []
        for ids in fast.batch_encode(texts, "do_not_pad", max_length + 1, False):
            if len(ids) > max_length:  # truncated: the limit's first ids, then [SEP], as the backbone's own
                out.append((ids[: max_length - 1] + ids[-1:], True))
            else:
                out.append((ids, False))
        return out

    probes = list(_FLASH_PROBES)
    expected = [(e.ids, len(e.overflowing) > 0) for e in tokenizer.encode_batch_fast(probes)]
    if encode(probes) != expected:
        log.warning("flash-tokenizer does not tokenize as the backbone's tokenizer does: not used")
        return None
    return encode


def flash_fit(tokenizer: Any) -> Callable[[str], bool]:
    """Whether a plain text (`_NOT_PLAIN` finds nothing in it) is fit for `flash_twin`: not if it holds a word
    longer than WordPiece's limit (the backbone's tokenizer makes it [UNK], flash-tokenizer splits it) or an
    added token's text such as "[CLS]" (the backbone's tokenizer keeps it whole, flash-tokenizer splits it).
    Checked on every Banking77 and SST-2 sentence and on generated texts (tests/unit/test_tokenizing.py).
    Three cheap scans rather than one regex of their alternatives (under 1 µs a short text, a quarter)."""
    longest = int(getattr(tokenizer.model, "max_input_chars_per_word", 100))
    # A run of non-space characters longer than the limit, matched from its start only (the look-behind),
    # so that the scan stays linear in the text's length.
    long_word = re.compile(rf"(?<![^ \t\n\r])[^ \t\n\r]{{{longest + 1}}}")
    contents = [token.content for token in tokenizer.get_added_tokens_decoder().values() if token.content]
    added = re.compile("|".join(re.escape(c) for c in contents), re.IGNORECASE) if contents else None
    starts = "".join({c[0].lower() + c[0].upper() for c in contents})

    def fit(text: str) -> bool:
        if len(text) > longest and long_word.search(text) is not None:
            return False
        return added is None or not any(c in text for c in starts) or added.search(text) is None

    return fit


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
        self.flash = flash_twin(self.tokenizer, max_length)  # for most of those: the same ids, cheaper still
        self._flash_fit = flash_fit(self.tokenizer)

    def clip(self, item: Input) -> Input:
        """The part of a text the backbone can see: cut by characters before tokenizing, so a huge text
        costs no more than a long one (and is stored no larger as a training example)."""
        text = _text(item)
        return item if len(text) <= self.max_chars else Input(text=text[: self.max_chars])

    def cheap(self, inputs: Sequence[Input]) -> bool:
        """Cheaper to tokenize where it is than to hand to a thread: a few short texts."""
        return len(inputs) <= 8 and sum(len(_text(item)) for item in inputs) <= CHEAP_CHARS

    def prepare_inline(self, inputs: Sequence[Input]) -> list[Prepared] | None:
        """`prepare(inputs)` where it is cheap and every text goes to flash-tokenizer, else None (`Preparer`
        then decides). Such a request is prepared on the event loop even under load, since flash-tokenizer
        holds the GIL and would gain nothing in a thread (single-text Classify calls, two workers: about 4%
        less server CPU a call, docs/BENCHMARKS.md). Each text is routed once, to decide and to tokenize."""
        if self.flash is None or not self.cheap(inputs):
            return None
        clipped = [self.clip(item) for item in inputs]
        texts = [_text(item) for item in clipped]
        if not all(self._route(text) == 0 for text in texts):
            return None
        return _prepared(self.flash(texts), inputs, clipped)

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        return self.prepare_many([inputs])[0]

    def prepare_many(self, groups: Sequence[Sequence[Input]]) -> list[list[Prepared]]:
        """Several requests' inputs in one tokenizer call (a batch call per tokenizer: flash-tokenizer's for
        most texts, the Rust one, which releases the GIL and skips the character offsets, for the rest)."""
        clipped = [[self.clip(item) for item in inputs] for inputs in groups]
        encoded = self.encode([_text(item) for short in clipped for item in short])
        out: list[list[Prepared]] = []
        start = 0
        for inputs, short in zip(groups, clipped, strict=True):
            out.append(_prepared(encoded[start : start + len(inputs)], inputs, short))
            start += len(inputs)
        return out

    def encode(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """Each text's ids and whether they were truncated, as the backbone's tokenizer gives them: plain
        ASCII texts through flash-tokenizer where it is fit for them (`flash_fit`), else through the
        cheaper twin; the rest through the tokenizer itself."""
        routes = [self._route(text) for text in texts]
        if len(set(routes)) <= 1:
            return self._encode_by(routes[0], texts) if routes else []
        out: list[tuple[list[int], bool]] = [([], False)] * len(texts)
        for route in sorted(set(routes)):
            where = [i for i, r in enumerate(routes) if r == route]
            for i, encoded in zip(where, self._encode_by(route, [texts[i] for i in where]), strict=True):
                out[i] = encoded
        return out

    def _encode_by(self, route: int, texts: list[str]) -> list[tuple[list[int], bool]]:
        if route == 0 and self.flash is not None:
            return self.flash(texts)
        tokenizer = self.plain if route == 1 and self.plain is not None else self.tokenizer
        return [(e.ids, len(e.overflowing) > 0) for e in tokenizer.encode_batch_fast(texts)]

    def _route(self, text: str) -> int:
        """0: flash-tokenizer, 1: the plain twin, 2: the tokenizer itself."""
        # isascii is O(1) in CPython: it spares the scans for texts that are not ASCII at all.
        if not text.isascii() or _NOT_PLAIN.search(text) is not None:
            return 2
        return 0 if self.flash is not None and self._flash_fit(text) else 1

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


def _prepared(
    encoded: Sequence[tuple[list[int], bool]], inputs: Sequence[Input], clipped: Sequence[Input]
) -> list[Prepared]:
    """Each text's items from its ids: truncated by the tokenizer, or cut before it (`clip`)."""
    out = []
    for (ids, truncated), item, cut in zip(encoded, inputs, clipped, strict=True):
        payload = np.asarray(ids, dtype=np.int64)
        out.append(Prepared(payload, len(payload), len(payload), truncated or cut is not item))
    return out


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
