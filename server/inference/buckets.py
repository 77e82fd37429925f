"""Shape buckets: every forward pass padded to one of a few fixed (rows, length) shapes, all run at warm-up.

ONNX Runtime's CUDA provider pays 10 to 40 ms the first time it meets an input shape (measured on an H200:
`../shared/gpu/ort_shapes.py`), and a server whose batches take any size from 1 to 256 and any length from 3
to 256 meets a new shape on nearly every batch. Padded to a bucket, a batch reuses a shape that warm-up has
already run: 300 random batches went from 75 ms to 2.3 ms each there (`../shared/gpu/buckets.py`).

The grid keeps padding bounded: rows are powers of two (the batcher takes the bucket below when the one above
would be more padding than the policy allows), lengths step by 8 tokens up to 64, by 16 up to 128 and by 32
beyond (at most a quarter of a bucket is padding past 24 tokens). Images have no length axis: rows only.

On a CPU padding is pure cost (every padded token is computed), and ONNX Runtime's CPU provider has no
per-shape cost to save, so buckets are on by default on CUDA alone (`--shape-buckets auto`).

Everything here is pure and tested on its own (tests/unit/test_buckets.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Token lengths of the text buckets, before capping at the backbone's max_length.
LENGTHS = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def _powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    sizes = []
    size = 1
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)


@dataclass(frozen=True)
class ShapeBuckets:
    rows: tuple[int, ...]  # ascending; the last is the most items a batch may hold
    lengths: tuple[int, ...]  # ascending; empty for inputs with no length axis (images)

    def __post_init__(self) -> None:
        if not self.rows or list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ValueError(f"bucket rows must be distinct, ascending and positive, not {self.rows}")
        if list(self.lengths) != sorted(set(self.lengths)) or (self.lengths and self.lengths[0] < 1):
            raise ValueError(f"bucket lengths must be distinct, ascending and positive, not {self.lengths}")

    @classmethod
    def for_backbone(cls, max_items: int, max_length: int | None) -> ShapeBuckets:
        """Rows 1, 2, 4, ... up to `max_items`; lengths from `LENGTHS` up to `max_length` (which is always one
        of them), or none when `max_length` is None (images)."""
        if max_items < 1:
            raise ValueError(f"a batch holds at least one item, not {max_items}")
        if max_length is None:
            return cls(_powers_of_two_up_to(max_items), ())
        lengths = (*(length for length in LENGTHS if length < max_length), max_length)
        return cls(_powers_of_two_up_to(max_items), lengths)

    @property
    def max_rows(self) -> int:
        return self.rows[-1]

    def row_bucket(self, n: int) -> int:
        """The smallest row count that holds `n` items."""
        for rows in self.rows:
            if rows >= n:
                return rows
        raise ValueError(f"{n} items are more than the largest bucket holds ({self.rows[-1]})")

    def length_bucket(self, length: int) -> int:
        """The smallest bucket length that holds `length` tokens (0 when there is no length axis)."""
        if not self.lengths:
            return 0
        for bucket in self.lengths:
            if bucket >= length:
                return bucket
        raise ValueError(f"{length} tokens are more than the longest bucket ({self.lengths[-1]})")

    def shape(self, n: int, length: int) -> tuple[int, int]:
        """(rows, length) of the bucket a batch of `n` items of at most `length` tokens is padded to."""
        return self.row_bucket(n), self.length_bucket(length)

    def items_to_take(self, n: int, max_padding: float) -> int:
        """How many of `n` waiting items a batch should take: all of them, unless the padding rows of their
        bucket would be more than `max_padding` of it; then the largest bucket they fill (the rest start the
        next batch at once)."""
        bucket = self.row_bucket(n)
        if (bucket - n) <= max_padding * bucket:
            return n
        return max(rows for rows in self.rows if rows <= n)

    def shapes(self) -> list[tuple[int, int]]:
        """Every shape, smallest first (what warm-up runs)."""
        return [(rows, length) for rows in self.rows for length in (self.lengths or (0,))]
