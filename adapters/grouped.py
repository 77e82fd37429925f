"""Many tenants' heads applied to one mixed batch in one grouped operation per bucket.

`HeadStack` keeps the weights of every resident head on one device. Linear heads (the default kind) live
in slabs by class-count bucket (2, 4, 8, ... classes): `weight[slot]` of shape (bucket, dim), padded up to
the bucket with zero weights and a bias of -inf, so a padded class gets probability 0. A head therefore
costs at most twice its own size, whatever other tenants' heads look like (one slab for every class count
would pad a thousand 4-class heads to the widest). Scoring a batch gathers the slabs of the heads it needs
and runs one batched matrix multiply per bucket over "rows grouped by head". Heads of the other kinds (the
MLP) are stacked per batch, one group per kind, and applied by their kind's `stacked_logits` (spec.py's
registry; they are rare and larger, so they are not kept in a slab).

A head may come with references: unit-norm training embeddings (adapters/ood.py). `apply_scored` then adds,
in the same pass, each row's out-of-distribution score (1 - cosine similarity to the nearest reference of
its own head): one matrix product per head in the batch over its own rows, so a row costs a dot product per
reference of its head and nothing per other tenant.

Slots are copy-on-write: a new head version gets a new slot, and a slot is reused only after `release`,
which the owner calls once nothing can use the old version any more. So a request that took a version keeps
reading exactly that version's weights while newer versions are added beside it.

A slab doubles when full and halves when a quarter or less of it is in use and its upper half is free; new
heads take the lowest free row, so the used rows gather at the bottom. Memory therefore follows the heads
resident now, not the most a bucket ever held (tenants gaining classes move up to wider buckets and would
otherwise leave their old rows allocated behind them).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .host_scoring import scored_on_host
from .spec import HEAD_KINDS, HeadSpec, expected_state_shapes, head_kind

NEG_INF = float("-inf")
_SLOT_BITS = 32  # a linear slot id is bucket << 32 | row in that bucket's slab
_ROW_MASK = (1 << _SLOT_BITS) - 1


def bucket_of(classes: int) -> int:
    """The slab a head of `classes` classes lives in: the next power of two."""
    return max(2, 1 << (classes - 1).bit_length())


@dataclass(frozen=True)
class _Stacked:
    """A head of a kind that is not a linear map: its tensors in `expected_state_shapes` order."""

    kind: str
    tensors: tuple[torch.Tensor, ...]


@dataclass
class _Slab:
    weight: torch.Tensor  # (slots, bucket, dim)
    bias: torch.Tensor  # (slots, bucket)
    free: list[int] = field(default_factory=list)  # a min-heap: the lowest free row is used first
    used: set[int] = field(default_factory=set)
    _host: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        """The slab's weight and bias as numpy views (CPU only), made again after a grow or a shrink."""
        if self._host is None or self._host[0] is not self.weight:
            self._host = (self.weight, self.weight.numpy(), self.bias.numpy())
        return self._host[1], self._host[2]


class HeadStack:
    def __init__(self, input_dim: int, device: str = "cpu", initial_slots: int = 4) -> None:
        self.input_dim = input_dim
        self.device = torch.device(device)
        self.initial_slots = initial_slots
        self._lock = threading.Lock()
        self._slabs: dict[int, _Slab] = {}
        self._classes: dict[int, int] = {}  # slot -> number of classes
        self._stacked: dict[int, _Stacked] = {}
        self._refs: dict[int, torch.Tensor] = {}  # slot -> (m, dim) unit-norm training embeddings
        self._host_refs: dict[int, np.ndarray] = {}  # the same as numpy views, on a CPU
        self._next_stacked = -1  # stacked heads get negative ids: they have no slab row

    def __len__(self) -> int:
        return len(self._classes)

    def _slab(self, bucket: int) -> _Slab:
        slab = self._slabs.get(bucket)
        if slab is None:
            n = self.initial_slots
            slab = _Slab(
                torch.zeros((n, bucket, self.input_dim), device=self.device),
                torch.full((n, bucket), NEG_INF, device=self.device),
                list(range(n)),
            )
            self._slabs[bucket] = slab
        elif not slab.free:
            # A larger copy; readers holding the old tensors keep valid data.
            old = slab.weight.shape[0]
            weight = torch.zeros((old * 2, bucket, self.input_dim), device=self.device)
            bias = torch.full((old * 2, bucket), NEG_INF, device=self.device)
            weight[:old], bias[:old] = slab.weight, slab.bias
            slab.weight, slab.bias, slab.free = weight, bias, list(range(old, old * 2))
        return slab

    def _shrink(self, slab: _Slab) -> None:
        """Halve the slab while a quarter or less of it is used and nothing lives in its upper half. Copies,
        so readers holding the old tensors keep valid data (no live head is in the rows dropped)."""
        size = slab.weight.shape[0]
        while (
            size > self.initial_slots
            and len(slab.used) * 4 <= size
            and max(slab.used, default=-1) < size // 2
        ):
            size //= 2
        if size < slab.weight.shape[0]:
            slab.weight, slab.bias = slab.weight[:size].clone(), slab.bias[:size].clone()
            slab.free = [row for row in range(size) if row not in slab.used]  # ascending: already a heap

    def add(
        self, spec: HeadSpec, state: Mapping[str, np.ndarray], references: np.ndarray | None = None
    ) -> int:
        """Place a head's weights (and its unit-norm training embeddings, if any); returns its slot id."""
        slot = self._add(spec, state)
        if references is not None and len(references):
            if np.shape(references)[1:] != (self.input_dim,):
                self.release(slot)
                raise ValueError(
                    f"references have shape {np.shape(references)}, expected (m, {self.input_dim})"
                )
            refs = torch.as_tensor(np.asarray(references, dtype=np.float32), device=self.device)
            with self._lock:
                self._refs[slot] = refs
                if self.device.type == "cpu":
                    self._host_refs[slot] = refs.numpy()
        return slot

    def _add(self, spec: HeadSpec, state: Mapping[str, np.ndarray]) -> int:
        if spec.input_dim != self.input_dim:
            raise ValueError(f"head input dim {spec.input_dim} != stack dim {self.input_dim}")
        expected = expected_state_shapes(spec)
        for name, shape in expected.items():
            if np.shape(state[name]) != shape:
                raise ValueError(f"tensor {name} has shape {np.shape(state[name])}, expected {shape}")

        def tensor(name: str) -> torch.Tensor:
            return torch.as_tensor(np.asarray(state[name], dtype=np.float32), device=self.device)

        kind = head_kind(spec.kind)
        with self._lock:
            if not kind.linear_map:
                slot = self._next_stacked
                self._next_stacked -= 1
                self._stacked[slot] = _Stacked(spec.kind, tuple(tensor(name) for name in expected))
                self._classes[slot] = spec.num_classes
                return slot
            bucket = bucket_of(spec.num_classes)
            slab = self._slab(bucket)
            row = heapq.heappop(slab.free)
            slab.used.add(row)
            slab.weight[row].zero_()
            slab.bias[row].fill_(NEG_INF)
            weight, bias = kind.output
            slab.weight[row, : spec.num_classes] = tensor(weight)
            slab.bias[row, : spec.num_classes] = tensor(bias)
            slot = bucket << _SLOT_BITS | row
            self._classes[slot] = spec.num_classes
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._refs.pop(slot, None)
            self._host_refs.pop(slot, None)
            if self._classes.pop(slot, None) is None:
                return
            if slot < 0:
                del self._stacked[slot]
            else:
                slab, row = self._slabs[slot >> _SLOT_BITS], slot & ((1 << _SLOT_BITS) - 1)
                slab.used.discard(row)
                heapq.heappush(slab.free, row)
                self._shrink(slab)

    def num_classes(self, slot: int) -> int:
        return self._classes[slot]

    def nbytes(self, slot: int) -> int:
        refs = self._refs.get(slot)
        extra = 0 if refs is None else refs.numel() * refs.element_size()
        if slot < 0:
            return extra + sum(t.numel() * t.element_size() for t in self._stacked[slot].tensors)
        return extra + (slot >> _SLOT_BITS) * (self.input_dim + 1) * 4

    def allocated_bytes(self) -> int:
        """Everything the stack holds on its device, free slab rows included."""
        with self._lock:
            slabs = sum(s.weight.numel() * 4 + s.bias.numel() * 4 for s in self._slabs.values())
            stacked = sum(self.nbytes(slot) for slot in self._stacked)
            refs = sum(t.numel() * t.element_size() for t in self._refs.values())
        return slabs + stacked + refs

    @torch.inference_mode()
    def apply(self, embeddings: np.ndarray | torch.Tensor, slots: Sequence[int]) -> list[np.ndarray]:
        """Probabilities for each row under the head in `slots[row]`: one array (classes of that head,)
        per row. One grouped operation per bucket of linear heads, one per other kind (the MLP heads)."""
        x = torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] != len(slots):
            raise ValueError(f"expected embeddings ({len(slots)}, {self.input_dim}), got {tuple(x.shape)}")
        if len(slots) and slots[0] >= 0 and all(slot == slots[0] for slot in slots):
            return self._apply_one(x, int(slots[0]), len(slots))
        slot_arr = np.asarray(slots, dtype=np.int64)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(slots)
        with self._lock:
            slabs = {b: (s.weight, s.bias) for b, s in self._slabs.items()}
            classes = dict(self._classes)
            stacked = {s: self._stacked[s] for s in set(slot_arr[slot_arr < 0].tolist())}
        # A bucket's group is the bucket (> 0); a stacked kind's is -1 - its place in HEAD_KINDS.
        groups = np.where(slot_arr < 0, 0, slot_arr >> _SLOT_BITS)
        if stacked:
            rows_stacked = slot_arr < 0
            groups[rows_stacked] = [-1 - HEAD_KINDS.index(stacked[s].kind) for s in slot_arr[rows_stacked]]
        for group in np.unique(groups).tolist():
            rows = np.flatnonzero(groups == group)
            uniq, inverse = np.unique(slot_arr[rows], return_inverse=True)
            grouped, rank = _group_rows(x[torch.as_tensor(rows, device=self.device)], inverse, len(uniq))
            if group > 0:
                weight, bias = slabs[group]
                index = torch.as_tensor(uniq & ((1 << _SLOT_BITS) - 1), device=self.device)
                w, b = weight.index_select(0, index), bias.index_select(0, index)
                logits = torch.baddbmm(b.unsqueeze(1), grouped, w.transpose(1, 2))
            else:
                kind = head_kind(HEAD_KINDS[-1 - group]).module()
                logits = kind.stacked_logits(grouped, [stacked[int(s)].tensors for s in uniq], self.device)
            probs = torch.softmax(logits, dim=-1)
            picked = probs[
                torch.as_tensor(inverse, device=self.device), torch.as_tensor(rank, device=self.device)
            ]
            host = picked.float().cpu().numpy()
            for i, row in enumerate(rows):
                out[row] = host[i, : classes[int(slot_arr[row])]]
        return out

    @torch.inference_mode()
    def ood_scores(self, embeddings: np.ndarray | torch.Tensor, slots: Sequence[int]) -> np.ndarray:
        """Each row's out-of-distribution score under the head in `slots[row]`: 1 - its cosine similarity to
        the nearest of that head's references; NaN for a head stored without references.

        One matrix product per head in the batch, over its own rows and references only: a row costs a dot
        product per reference of its head, whatever other tenants keep. (Padding every head's references to
        the most any of them has, for one batched product, copied them all on every batch: measured 1.3 s for
        256 rows of 256 different 77-class heads, against 0.2 s for their probabilities.)"""
        x = torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
        out = np.full(len(slots), np.nan, dtype=np.float32)
        with self._lock:
            refs = {s: self._refs[s] for s in set(slots) if s in self._refs}
        if not refs or x.shape[0] == 0:
            return out
        x = torch.nn.functional.normalize(x, dim=1)
        if len(refs) == 1 and len(set(slots)) == 1:  # one head: one matrix product
            (r,) = refs.values()
            out[:] = (1.0 - (x @ r.T).amax(dim=1)).cpu().numpy()
            return out
        slot_arr = np.asarray(slots, dtype=np.int64)
        order = np.argsort(slot_arr, kind="stable")
        uniq, starts, counts = np.unique(slot_arr[order], return_index=True, return_counts=True)
        grouped = x[torch.as_tensor(order, device=self.device)]  # rows of one head side by side: views below
        parts, rows = [], []
        for slot, start, count in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True):
            if slot in refs:
                parts.append((grouped[start : start + count] @ refs[slot].T).amax(dim=1))
                rows.append(order[start : start + count])
        out[np.concatenate(rows)] = (1.0 - torch.cat(parts)).cpu().numpy()
        return out

    def apply_scored(
        self, embeddings: np.ndarray | torch.Tensor, slots: Sequence[int]
    ) -> list[tuple[np.ndarray, float]]:
        """`apply`'s probabilities, each row with its out-of-distribution score. On a CPU in numpy, one
        head at a time (host_scoring.py); on a GPU with `apply` and `ood_scores`' grouped operations."""
        if self.device.type == "cpu":
            return scored_on_host(self, embeddings, slots)
        probs = self.apply(embeddings, slots)
        scores = self.ood_scores(embeddings, slots).tolist()
        return list(zip(probs, scores, strict=True))

    def host_views(
        self, heads: Sequence[int]
    ) -> tuple[list[int], dict[int, tuple[np.ndarray, np.ndarray]], dict[int, np.ndarray]]:
        """On a CPU, for `heads` (slots): their class counts; the weight and bias of the linear ones and the
        references of those that have them, as numpy views of what the stack holds (taken under its lock;
        rows in use are never written, so the views stay valid while the caller holds the heads)."""
        linear: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        refs: dict[int, np.ndarray] = {}
        with self._lock:
            classes = [self._classes[slot] for slot in heads]
            for slot, c in zip(heads, classes, strict=True):
                if slot >= 0:
                    weight, bias = self._slabs[slot >> _SLOT_BITS].host()
                    linear[slot] = (weight[slot & _ROW_MASK, :c], bias[slot & _ROW_MASK, :c])
                if slot in self._host_refs:
                    refs[slot] = self._host_refs[slot]
        return classes, linear, refs

    def _apply_one(self, x: torch.Tensor, slot: int, n: int) -> list[np.ndarray]:
        """Every row under one linear head (a single-tenant batch, a lone Classify): one matrix product and
        a softmax, without the grouping (measured: 180 µs -> about 40 µs for a row on a CPU)."""
        with self._lock:
            slab = self._slabs[slot >> _SLOT_BITS]
            row = slot & ((1 << _SLOT_BITS) - 1)
            weight, bias, classes = slab.weight[row], slab.bias[row], self._classes[slot]
        probs = torch.softmax(torch.addmm(bias[:classes], x, weight[:classes].T), dim=-1)
        host = probs.float().cpu().numpy()
        return [host[i] for i in range(n)]


def _group_rows(x: torch.Tensor, group: np.ndarray, groups: int) -> tuple[torch.Tensor, np.ndarray]:
    """Rows (n, dim) -> (groups, max rows in a group, dim), zero-padded; and each row's place in its group."""
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty_like(group)
    rank[order] = np.arange(len(group)) - np.repeat(starts, counts)
    grouped = x.new_zeros((groups, int(counts.max()), x.shape[1]))
    grouped[torch.as_tensor(group, device=x.device), torch.as_tensor(rank, device=x.device)] = x
    return grouped, rank
