"""Admission control for the batcher: refuse at once the calls that cannot be served in time.

The queue's bound is expressed in expected wait, not items: the work waiting (in cost units: tokens, or a
cost per image) divided by the rate the encoder gets through it, measured as it runs. A call is refused
with RESOURCE_EXHAUSTED, in microseconds instead of timing out seconds later, when the expected wait is
over the limit or when the call's own deadline would pass before its turn: under overload the server keeps
serving what it admitted at full speed (goodput holds) and tells everyone else to back off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from headswap.server.errors import ResourceExhausted


@dataclass
class Admission:
    max_items: int  # hard bound on inputs waiting
    max_wait_s: float  # bound on the expected wait
    queued_cost: float = 0.0  # admitted and not yet finished: estimated until prepared, then exact
    queued_inputs: int = 0  # the same inputs, counted: 0 means idle, whatever the float sums left over
    rate: float = 0.0  # cost units per second of encoder time, a moving average (0: not measured yet)
    item_cost: float = 0.0  # mean cost of one input, a moving average

    def expected_wait(self, extra_cost: float = 0.0) -> float:
        return (self.queued_cost + extra_cost) / self.rate if self.rate else 0.0

    def admit(self, n: int, queued_items: int, deadline: float | None) -> float:
        """Reserve room for `n` inputs or raise ResourceExhausted; returns the cost reserved."""
        if queued_items + n > self.max_items:
            raise ResourceExhausted(
                f"the server's queue is full ({queued_items} inputs waiting, limit {self.max_items}): retry "
                "later, with backoff, or on another replica"
            )
        cost = n * self.item_cost
        wait = self.expected_wait(cost)
        # A call on an idle server is always admitted, however big: nothing is ahead of it to make it late.
        if wait > self.max_wait_s and self.queued_inputs > 0:
            raise ResourceExhausted(
                f"the server is overloaded: about {wait * 1000:.0f} ms of work is queued, over its limit of "
                f"{self.max_wait_s * 1000:.0f} ms: retry later, with backoff, or on another replica"
            )
        if deadline is not None and time.monotonic() + wait > deadline:
            raise ResourceExhausted(
                f"the call's deadline is {max(0.0, deadline - time.monotonic()) * 1000:.0f} ms away but about "
                f"{wait * 1000:.0f} ms of work is queued ahead of it: retry with a longer deadline, later, or "
                "on another replica"
            )
        self.queued_cost += cost
        self.queued_inputs += n
        return cost

    def prepared(self, estimate: float, exact: float, n: int) -> None:
        """The call's inputs are prepared: replace the estimate by their exact cost."""
        self.queued_cost += exact - estimate
        per_item = exact / max(1, n)
        self.item_cost = per_item if not self.item_cost else 0.9 * self.item_cost + 0.1 * per_item

    def release(self, cost: float, n: int) -> None:
        """`n` inputs of `cost` left the queue: done, dropped, or never prepared. When none is left the
        cost is set to exactly 0, so that rounding in the sums never leaves an idle server looking busy."""
        self.queued_inputs = max(0, self.queued_inputs - n)
        self.queued_cost = max(0.0, self.queued_cost - cost) if self.queued_inputs else 0.0

    def ran(self, cost: float, seconds: float) -> None:
        if seconds > 0 and cost > 0:
            rate = cost / seconds
            self.rate = rate if not self.rate else 0.8 * self.rate + 0.2 * rate
