"""The head stage on a CPU: many tenants' linear heads and out-of-distribution scores over one mixed batch,
in numpy on views of what `HeadStack` holds (no copies of weights or references).

Rows are sorted by head, so that each head's rows are a slice; per head in the batch there is one product
with its weights and one with its references, and one softmax for every row at the end. This is the serving
path's head stage, run in the backbone's thread between forward passes. The grouped torch operations
(`HeadStack.apply`, `HeadStack.ood_scores`) pay a few microseconds per operation and release the GIL at each
one, so inside a busy server each operation can also wait for the event loop's thread to hand the GIL back:
measured on 2 cores, a batch of 16 rows of 16 tenants' heads (1,000 resident) took about 2.1 ms inside a loaded
server and 0.8 ms here (docs/BENCHMARKS.md, "Out-of-distribution scores: what they cost Classify across 1,000
tenants"). The torch operations stay for GPUs and for heads of a kind that is not a linear map (the MLP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .ood import normalize_rows

if TYPE_CHECKING:
    import torch

    from .grouped import HeadStack


def scored_on_host(
    stack: HeadStack, embeddings: np.ndarray | torch.Tensor, slots: Sequence[int]
) -> list[tuple[np.ndarray, float]]:
    """For each row, the probabilities of the head in `slots[row]` and the row's out-of-distribution score
    (NaN for a head stored without references): what `HeadStack.apply` and `ood_scores` give."""
    if not isinstance(embeddings, np.ndarray):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(slots)
    if x.ndim != 2 or x.shape[1] != stack.input_dim or x.shape[0] != n:
        raise ValueError(f"expected embeddings ({n}, {stack.input_dim}), got {tuple(x.shape)}")
    if n == 0:
        return []
    slot_arr = np.asarray(slots, dtype=np.int64)
    order: np.ndarray | None = None
    if (slot_arr == slot_arr[0]).all():
        heads, bounds = [int(slot_arr[0])], [0, n]
    else:  # rows of one head side by side
        order = np.argsort(slot_arr, kind="stable")
        x = x[order]
        uniq, starts = np.unique(slot_arr[order], return_index=True)
        heads, bounds = uniq.tolist(), [*starts.tolist(), n]
    classes, linear, refs = stack.host_views(heads)
    logits = np.zeros((n, max(classes)), dtype=np.float32)
    similarity = np.full(n, np.nan, dtype=np.float32)
    unit = normalize_rows(x) if refs else x
    other: list[int] = []  # heads that are not linear maps, by place in `heads`
    for place, slot in enumerate(heads):
        rows = slice(bounds[place], bounds[place + 1])
        if slot in linear:
            weight, bias = linear[slot]
            logits[rows, : len(bias)] = x[rows] @ weight.T
            logits[rows, : len(bias)] += bias
            logits[rows, len(bias) :] = -np.inf  # narrower than the widest head in the batch
        else:
            other.append(place)
        if slot in refs:
            similarity[rows] = (unit[rows] @ refs[slot].T).max(axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    probs = [
        logits[row, :c] for place, c in enumerate(classes) for row in range(bounds[place], bounds[place + 1])
    ]
    for place in other:
        rows = slice(bounds[place], bounds[place + 1])
        probs[rows] = stack.apply(x[rows], [heads[place]] * (rows.stop - rows.start))
    rows_out = list(zip(probs, (1.0 - similarity).tolist(), strict=True))
    if order is None:
        return rows_out
    return [rows_out[i] for i in np.argsort(order).tolist()]  # back in the caller's order
