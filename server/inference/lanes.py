"""The backbones a server serves, each a lane: the backbone, its batcher and its tenants' head stack.

A server may serve one text and one image backbone (or several, each named). Embed and AdaptHead go to the
lane of their inputs' kind, or the one they name; Classify to the lane of the tenant's head, which is bound
to the backbone weights it was trained on (whatever the precision: `headswap.server.binding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headswap.server.domain import BackboneDescription, Input
from headswap.server.errors import InvalidArgument
from headswap.server.inference.batcher import Batcher
from headswap.server.inference.protocols import Backbone


@dataclass(eq=False)
class Lane:
    name: str
    backbone: Backbone
    batcher: Batcher
    stack: Any  # headswap.adapters.grouped.HeadStack (torch stays out of this module)

    @property
    def kind(self) -> str:
        return self.backbone.manifest.input_kind

    def describe(self) -> BackboneDescription:
        """What served a call (in every reply): made once, it never changes while the lane lives."""
        described = self.__dict__.get("_described")
        if described is None:
            described = self.__dict__["_described"] = self.backbone.describe(self.name)
        return described  # type: ignore[no-any-return]


@dataclass(eq=False)
class Lanes:
    lanes: tuple[Lane, ...]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.lanes)

    @property
    def default(self) -> Lane:
        return self.lanes[0]

    def by_name(self, name: str) -> Lane:
        for lane in self.lanes:
            if lane.name == name:
                return lane
        served = ", ".join(f"{lane.name} ({lane.kind})" for lane in self.lanes)
        raise InvalidArgument(f"this server serves no backbone named {name!r}; it serves {served}")

    def by_weights(self, weights: str) -> Lane | None:
        """The lane serving the backbone family `weights` (in whatever precision it is served)."""
        return next((lane for lane in self.lanes if lane.backbone.weights == weights), None)

    def for_inputs(self, inputs: Sequence[Input], name: str = "") -> Lane:
        """The named lane, else the one lane that takes the first input's kind (the inputs are checked
        against the lane afterwards, so a call mixing kinds is told which input does not fit)."""
        if name:
            return self.by_name(name)
        kind = inputs[0].kind if inputs else self.default.kind
        matching = [lane for lane in self.lanes if lane.kind == kind]
        if len(matching) > 1:
            names = ", ".join(lane.name for lane in matching)
            raise InvalidArgument(
                f"several backbones here take {kind} inputs ({names}): name one in `backbone`"
            )
        return matching[0] if matching else self.default
