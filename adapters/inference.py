"""Serving a head: probabilities for a batch of embeddings, and top-k selection."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .heads import build_head
from .results import TrainedHead
from .serialization import LoadedHead
from .spec import HeadSpec, expected_state_shapes


class HeadModule:
    """A head's module, frozen in eval mode on one device.

    ``predict_proba`` only reads the module (no dropout, no autograd state, no buffers written),
    so one instance can serve concurrent requests from several threads without locking.
    """

    def __init__(self, spec: HeadSpec, module: nn.Module, device: torch.device) -> None:
        self._spec = spec
        self._module = module
        self._device = device

    @classmethod
    def from_state(cls, spec: HeadSpec, state: Mapping[str, np.ndarray], device: str = "cpu") -> HeadModule:
        expected = expected_state_shapes(spec)
        if set(state) != set(expected):
            raise ValueError(
                f"state has tensors {sorted(state)}, a {spec.kind} head needs {sorted(expected)}"
            )
        for name, shape in expected.items():
            if np.shape(state[name]) != shape:
                raise ValueError(f"tensor {name} has shape {np.shape(state[name])}, the spec implies {shape}")
        module = build_head(spec)
        # A copy, so that the module never aliases arrays the caller may keep mutating.
        tensors = {name: torch.from_numpy(np.array(state[name], dtype=np.float32)) for name in expected}
        module.load_state_dict(tensors, strict=True)
        target = torch.device(device)
        module = module.to(target).eval()
        module.requires_grad_(False)
        return cls(spec, module, target)

    @classmethod
    def from_head(cls, head: LoadedHead | TrainedHead, device: str = "cpu") -> HeadModule:
        return cls.from_state(head.spec, head.state, device=device)

    @property
    def spec(self) -> HeadSpec:
        return self._spec

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the module's parameters and buffers (on its device)."""
        tensors = [*self._module.parameters(), *self._module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 of shape (n, num_classes), for float embeddings (n, input_dim)."""
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self._spec.input_dim:
            raise ValueError(f"expected embeddings of shape (n, {self._spec.input_dim}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self._spec.num_classes), dtype=np.float32)
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._device)
        with torch.inference_mode():
            probs = torch.softmax(self._module(inputs), dim=1)
            return probs.cpu().numpy().astype(np.float32, copy=False)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes per row: (indices int64, probabilities), both (n, k), descending.

    ``k`` is clipped to the number of classes; ties keep the lower class index first, so results are
    deterministic. A 1-D ``probs`` is treated as a single row and gives 1-D results.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    array = np.asarray(probs)
    single = array.ndim == 1
    rows = array[None, :] if single else array
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"probs must have shape (n, num_classes), got {array.shape}")
    k = min(int(k), rows.shape[1])
    # A stable sort of the negated values orders equal probabilities by class index.
    indices = np.argsort(-rows, axis=1, kind="stable")[:, :k].astype(np.int64)
    values = np.take_along_axis(rows, indices, axis=1)
    if single:
        return indices[0], values[0]
    return indices, values
