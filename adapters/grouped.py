"""Many tenants' heads applied to one mixed batch in one grouped operation.

`HeadStack` keeps the weights of every resident head on one device. Linear heads (the default kind) live in
one slab tensor, `weight[slot]` of shape (classes, dim), padded to the largest class count with zero weights
and a bias of -inf, so a padded class gets probability 0. Scoring a batch gathers the slabs of the heads it
needs and runs one batched matrix multiply over "rows grouped by head"; a batch of one tenant is a single
GEMM, a batch of a thousand tenants is one bmm. MLP heads are stacked per batch the same way (they are rare
and larger, so they are not kept in a slab).

Slots are copy-on-write: a new head version gets a new slot, and a slot is reused only after `release`, which
the owner calls once nothing can use the old version any more. So a request that took a version keeps
reading exactly that version's weights while newer versions are added beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .heads import HeadSpec, expected_state_shapes

NEG_INF = float("-inf")


@dataclass(frozen=True)
class _MLPWeights:
    w1: torch.Tensor  # (hidden, dim)
    b1: torch.Tensor  # (hidden,)
    w2: torch.Tensor  # (classes, hidden)
    b2: torch.Tensor  # (classes,)


class HeadStack:
    def __init__(self, input_dim: int, device: str = "cpu", initial_slots: int = 16) -> None:
        self.input_dim = input_dim
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._weight = torch.zeros((initial_slots, 2, input_dim), device=self.device)
        self._bias = torch.full((initial_slots, 2), NEG_INF, device=self.device)
        self._free = list(range(initial_slots - 1, -1, -1))
        self._classes: dict[int, int] = {}  # slot -> number of classes
        self._mlp: dict[int, _MLPWeights] = {}
        self._next_mlp = -1  # MLP heads get negative ids: they have no slab row

    def __len__(self) -> int:
        return len(self._classes)

    def _grow(self, slots: int, classes: int) -> None:
        """Replace the slab with a larger copy; readers holding the old tensors keep valid data."""
        old_slots, old_classes, dim = self._weight.shape
        weight = torch.zeros((slots, classes, dim), device=self.device)
        bias = torch.full((slots, classes), NEG_INF, device=self.device)
        weight[:old_slots, :old_classes] = self._weight
        bias[:old_slots, :old_classes] = self._bias
        self._free = list(range(slots - 1, old_slots - 1, -1)) + self._free
        self._weight, self._bias = weight, bias

    def add(self, spec: HeadSpec, state: Mapping[str, np.ndarray]) -> int:
        """Place a head's weights; returns its slot id."""
        if spec.input_dim != self.input_dim:
            raise ValueError(f"head input dim {spec.input_dim} != stack dim {self.input_dim}")
        expected = expected_state_shapes(spec)
        for name, shape in expected.items():
            if np.shape(state[name]) != shape:
                raise ValueError(f"tensor {name} has shape {np.shape(state[name])}, expected {shape}")

        def tensor(name: str) -> torch.Tensor:
            return torch.as_tensor(np.asarray(state[name], dtype=np.float32), device=self.device)

        with self._lock:
            if spec.kind == "mlp":
                slot = self._next_mlp
                self._next_mlp -= 1
                self._mlp[slot] = _MLPWeights(
                    tensor("hidden.weight"),
                    tensor("hidden.bias"),
                    tensor("output.weight"),
                    tensor("output.bias"),
                )
                self._classes[slot] = spec.num_classes
                return slot
            slots, classes, _ = self._weight.shape
            if not self._free or spec.num_classes > classes:
                self._grow(
                    slots * 2 if not self._free else slots,
                    max(classes, spec.num_classes),
                )
            slot = self._free.pop()
            self._weight[slot].zero_()
            self._bias[slot].fill_(NEG_INF)
            self._weight[slot, : spec.num_classes] = tensor("weight")
            self._bias[slot, : spec.num_classes] = tensor("bias")
            self._classes[slot] = spec.num_classes
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if self._classes.pop(slot, None) is None:
                return
            if slot < 0:
                del self._mlp[slot]
            else:
                self._free.append(slot)

    def num_classes(self, slot: int) -> int:
        return self._classes[slot]

    def nbytes(self, slot: int) -> int:
        if slot < 0:
            m = self._mlp[slot]
            return sum(t.numel() * t.element_size() for t in (m.w1, m.b1, m.w2, m.b2))
        return (self._weight.shape[1] * (self.input_dim + 1)) * self._weight.element_size()

    @torch.inference_mode()
    def apply(self, embeddings: np.ndarray | torch.Tensor, slots: Sequence[int]) -> list[np.ndarray]:
        """Probabilities for each row under the head in `slots[row]`: one array (classes of that head,)
        per row. One grouped operation for the linear heads, one for the MLP heads."""
        x = torch.as_tensor(embeddings, dtype=torch.float32).to(self.device)
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] != len(slots):
            raise ValueError(f"expected embeddings ({len(slots)}, {self.input_dim}), got {tuple(x.shape)}")
        slot_arr = np.asarray(slots, dtype=np.int64)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(slots)
        with self._lock:
            weight, bias = self._weight, self._bias
            classes = dict(self._classes)
            mlps = {s: self._mlp[s] for s in set(slot_arr[slot_arr < 0].tolist())}
        for linear in (True, False):
            rows = np.flatnonzero(slot_arr >= 0) if linear else np.flatnonzero(slot_arr < 0)
            if rows.size == 0:
                continue
            uniq, inverse = np.unique(slot_arr[rows], return_inverse=True)
            grouped, rank = _group_rows(x[torch.as_tensor(rows, device=self.device)], inverse, len(uniq))
            if linear:
                index = torch.as_tensor(uniq, device=self.device)
                w, b = weight.index_select(0, index), bias.index_select(0, index)
                logits = torch.baddbmm(b.unsqueeze(1), grouped, w.transpose(1, 2))
            else:
                logits = _mlp_logits(grouped, [mlps[int(s)] for s in uniq], self.device)
            probs = torch.softmax(logits, dim=-1)
            picked = probs[
                torch.as_tensor(inverse, device=self.device), torch.as_tensor(rank, device=self.device)
            ]
            host = picked.float().cpu().numpy()
            for i, row in enumerate(rows):
                out[row] = host[i, : classes[int(slot_arr[row])]]
        return out


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


def _mlp_logits(grouped: torch.Tensor, heads: list[_MLPWeights], device: torch.device) -> torch.Tensor:
    hidden = max(h.w1.shape[0] for h in heads)
    classes = max(h.w2.shape[0] for h in heads)
    dim = grouped.shape[2]
    w1 = torch.zeros((len(heads), hidden, dim), device=device)
    b1 = torch.zeros((len(heads), hidden), device=device)
    w2 = torch.zeros((len(heads), classes, hidden), device=device)
    b2 = torch.full((len(heads), classes), NEG_INF, device=device)
    for i, h in enumerate(heads):
        # Padded hidden units have zero weights in and out, so GELU(0) = 0 adds nothing.
        w1[i, : h.w1.shape[0]] = h.w1
        b1[i, : h.b1.shape[0]] = h.b1
        w2[i, : h.w2.shape[0], : h.w2.shape[1]] = h.w2
        b2[i, : h.b2.shape[0]] = h.b2
    hidden_out = torch.nn.functional.gelu(torch.baddbmm(b1.unsqueeze(1), grouped, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden_out, w2.transpose(1, 2))
