"""Admission control for the batcher: refuse at once the calls that cannot be served in time.

The queue's bound is expressed in expected wait, not items: the work waiting (in cost units: tokens, or a
cost per image) divided by the rate the server gets through it, measured as it runs (under load: from one
batch's end to the next, not the encoder's time alone), scaled by how far finished calls ran past such
predictions (`waited`: their 98th percentile), so that the bound holds for what accepted calls actually wait.
A call is refused with RESOURCE_EXHAUSTED, in microseconds instead of timing out seconds later, when the
expected wait is over the limit or when the call's own deadline would pass before its turn: under overload
the server keeps serving what it admitted and tells everyone else to back off (and, for a second after each
refusal, `refusing` tells the encoder to leave a core to the event loop that answers them).

The wait is a fair one. Work belongs to a flow (a tenant, a key, or a single call: the batcher's callers
say which), and the batcher takes turns between flows, each leading one batch a round, so a call starts
once its own flow's queued work is done and every other flow has had as much (or all it has queued, if
less), plus one batch each for the turn it leads: that is the wait held to the bound. One caller's mountain
of work therefore delays that caller, not the small calls of everyone else; a big call on an idle server
starts at once, however big; and many callers at once still make the server refuse. The call's deadline is
held to when it would be done: the same sum with its own work added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from headswap.server.errors import ResourceExhausted

# For this long after it refused a call the server counts as refusing: its forward passes leave a core to the
# event loop (`--overload-spare-core`), which refuses and answers the calls.
RELIEF_S = 1.0
# Calls wait longer than the queued work at the measured rate says (batches of nearby lengths form out of
# arrival order; the rate moves): the expected wait is scaled by the ratio of actual to predicted waits that
# WAIT_QUANTILE of admitted calls stayed within, tracked as they finish, between 1 and MAX_WAIT_SCALE. Only calls
# admitted behind a real queue (a predicted wait of at least QUEUED_SHARE of the bound) are counted. With no
# such calls the scale's excess over 1 halves every WAIT_SCALE_HALF_LIFE_S: what one overload taught (a stall
# makes every call of a batch late at once) is not held against the next one minutes later.
WAIT_QUANTILE = 0.98
WAIT_STEP = 0.05
MAX_WAIT_SCALE = 4.0
QUEUED_SHARE = 0.25
WAIT_SCALE_HALF_LIFE_S = 10.0
# The most one batch's span can lower the measured service rate, as a factor of the rate before it (the
# average then falls at most 1.6x a batch: 1 / (0.8 + 0.2 * 4)).
STALL_FACTOR = 4.0


@dataclass
class Admission:
    max_items: int  # hard bound on inputs waiting (prepared or being prepared)
    max_wait_s: float  # bound on the expected wait
    queued_cost: float = 0.0  # admitted and not yet finished: estimated until prepared, then exact
    queued_inputs: int = 0  # the same inputs, counted: 0 means idle, whatever the float sums left over
    rate: float = 0.0  # cost units per second of encoder time, a moving average (0: not measured yet)
    # Cost units per second of the whole server's time while work was waiting: from one batch's end to the
    # next's, so it counts what the encoder's own time does not (tokenizing, the heads, the event loop's
    # decoding and replies, other threads on the same cores). Under load it is what sets the waits.
    service_rate: float = 0.0
    backlog_since: float = 0.0  # when the last batch ended with more work waiting (0: the queue was empty)
    item_cost: float = 0.0  # mean cost of one input, a moving average
    batch_cost: float = 0.0  # real cost of one batch, a moving average: what a turn gives a flow
    flow_cost: dict[str, float] = field(default_factory=dict)  # queued cost by flow
    flow_inputs: dict[str, int] = field(default_factory=dict)
    refused_at: float = float("-inf")  # when a call was last refused (time.monotonic())
    wait_scale: float = 1.0  # actual waits over predicted ones, WAIT_QUANTILE of them (see `waited`)
    wait_scale_at: float = 0.0  # when it was last moved (time.monotonic())
    predicted: float = 0.0  # the last admitted call's wait until done, unscaled (`queued_wait`), for `waited`

    def refusing(self, now: float | None = None) -> bool:
        """Whether a call was refused in the last RELIEF_S seconds: the server is overloaded."""
        return (time.monotonic() if now is None else now) - self.refused_at < RELIEF_S

    def _refuse(self, message: str) -> ResourceExhausted:
        self.refused_at = time.monotonic()
        return ResourceExhausted(message)

    def expected_wait(self, extra_cost: float = 0.0, flow: str = "") -> float:
        """Seconds until `extra_cost` more work of `flow` would be done, with turns taken between flows (0:
        until the flow's queued work is done and its next call starts)."""
        return self.scale() * self.queued_wait(extra_cost, flow)

    def scale(self, now: float | None = None) -> float:
        """`wait_scale` as it stands at `now` (time.monotonic()): its excess over 1 decays while unmoved."""
        if self.wait_scale == 1.0:
            return 1.0
        idle = (time.monotonic() if now is None else now) - self.wait_scale_at
        return 1.0 + (self.wait_scale - 1.0) * 0.5 ** (max(0.0, idle) / WAIT_SCALE_HALF_LIFE_S)

    def queued_wait(self, extra_cost: float = 0.0, flow: str = "") -> float:
        """The same, unscaled: the work queued ahead at the measured rate."""
        rate = min(self.rate, self.service_rate) if self.service_rate else self.rate
        if not rate:
            return 0.0
        own = self.flow_cost.get(flow, 0.0) + extra_cost
        turn = max(self.batch_cost, self.item_cost)
        others = sum(min(cost, own + turn) for name, cost in self.flow_cost.items() if name != flow)
        return (own + others) / rate

    def waited(self, predicted: float, actual: float, now: float | None = None) -> None:
        """An admitted call is done: it was predicted `predicted` seconds (`queued_wait` once admitted) and took
        `actual` from admission to its result. Moves `wait_scale` towards the WAIT_QUANTILE of actual over
        predicted (a stochastic quantile estimate: up by WAIT_STEP x WAIT_QUANTILE when a call took longer
        than scaled, down by WAIT_STEP x (1 - WAIT_QUANTILE) otherwise), so that accepted calls wait at most
        about the bound (issue 23.6: p99 twice the bound when the prediction was taken as is)."""
        if predicted < QUEUED_SHARE * self.max_wait_s:
            return
        now = time.monotonic() if now is None else now
        scale = self.scale(now)
        scale *= (
            1 + WAIT_STEP * WAIT_QUANTILE
            if actual > scale * predicted
            else 1 - WAIT_STEP * (1 - WAIT_QUANTILE)
        )
        self.wait_scale = min(MAX_WAIT_SCALE, max(1.0, scale))
        self.wait_scale_at = now

    def admit(
        self, n: int, queued_items: int, deadline: float | None, flow: str = "", holds: int | None = None
    ) -> float:
        """Reserve room for `n` inputs of `flow` or raise ResourceExhausted; returns the cost reserved.
        `queued_items`: inputs waiting now; `holds`: how many of the call's inputs it keeps in the queue at
        once (a call entering in slices holds a slice; default all): the hard bound counts both."""
        if queued_items + (n if holds is None else holds) > self.max_items:
            raise self._refuse(
                f"the server's queue is full ({queued_items} inputs waiting, limit {self.max_items}): retry "
                "later, with backoff, or on another replica"
            )
        cost = n * self.item_cost
        scale = self.scale()
        wait = scale * self.queued_wait(0.0, flow)
        if wait > self.max_wait_s:
            raise self._refuse(
                f"the server is overloaded: about {wait * 1000:.0f} ms of work is queued, over its limit of "
                f"{self.max_wait_s * 1000:.0f} ms: retry later, with backoff, or on another replica"
            )
        predicted = self.queued_wait(cost, flow)
        done = scale * predicted
        if deadline is not None and time.monotonic() + done > deadline:
            raise self._refuse(
                f"the call's deadline is {max(0.0, deadline - time.monotonic()) * 1000:.0f} ms away but about "
                f"{done * 1000:.0f} ms of work is queued ahead of it and in it: retry with a longer deadline, "
                "later, or on another replica"
            )
        self.predicted = predicted
        self.queued_cost += cost
        self.queued_inputs += n
        self.flow_cost[flow] = self.flow_cost.get(flow, 0.0) + cost
        self.flow_inputs[flow] = self.flow_inputs.get(flow, 0) + n
        return cost

    def prepared(self, estimate: float, exact: float, n: int, flow: str = "") -> None:
        """The call's inputs are prepared: replace the estimate by their exact cost."""
        self.queued_cost += exact - estimate
        if flow in self.flow_cost:
            self.flow_cost[flow] = max(0.0, self.flow_cost[flow] + exact - estimate)
        per_item = exact / max(1, n)
        self.item_cost = per_item if not self.item_cost else 0.9 * self.item_cost + 0.1 * per_item

    def release(self, cost: float, n: int, flow: str = "") -> None:
        """`n` inputs of `cost` left the queue: done, dropped, or never prepared. When none is left the
        cost is set to exactly 0, so that rounding in the sums never leaves an idle server looking busy."""
        self.queued_inputs = max(0, self.queued_inputs - n)
        self.queued_cost = max(0.0, self.queued_cost - cost) if self.queued_inputs else 0.0
        left = self.flow_inputs.get(flow, 0) - n
        if left > 0:
            self.flow_inputs[flow] = left
            self.flow_cost[flow] = max(0.0, self.flow_cost.get(flow, 0.0) - cost)
        else:  # a flow with nothing queued is forgotten (callers' names never accumulate)
            self.flow_inputs.pop(flow, None)
            self.flow_cost.pop(flow, None)

    def ran(self, cost: float, seconds: float, started: float = 0.0, now: float | None = None) -> None:
        """A batch of `cost` took the encoder `seconds`; it was handed to the encoder at `started` and ended
        at `now` (perf_counter), after `release`. What it cost the server is the time from then, or, while
        work kept waiting, from the previous batch's end: the expected waits follow that rate, so an accepted
        call's wait stays near the bound however much of a call's time is spent outside the encoder (issue
        23.6: the heads, tokenizing, the event loop)."""
        now = time.perf_counter() if now is None else now
        if seconds > 0 and cost > 0:
            rate = cost / seconds
            self.rate = rate if not self.rate else 0.8 * self.rate + 0.2 * rate
            self.batch_cost = cost if not self.batch_cost else 0.9 * self.batch_cost + 0.1 * cost
            since = max(started, self.backlog_since)
            span = max(seconds, now - since) if since else seconds
            served = cost / span
            if self.service_rate:
                # One batch may lower the rate by at most STALL_FACTOR: a single stall (a collection of the
                # garbage of a thousand trainings, a hypervisor pause) then cannot make a short queue look
                # like a second's wait, while a server that stays slow still reaches its rate in a few batches.
                # Averaged as time per cost unit, so that slow batches weigh as much as they cost.
                served = 1 / (0.8 / self.service_rate + 0.2 / max(served, self.service_rate / STALL_FACTOR))
            self.service_rate = served
        self.backlog_since = now if self.queued_inputs else 0.0
