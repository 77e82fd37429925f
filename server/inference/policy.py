"""What a batcher may do: the bounds of one forward pass and of its queue (`BatchPolicy`), and the rules of
thumb that pace it.

A policy has no defaults of its own: the server builds it from its settings (`BatchingConfig.policy`, whose
defaults are declared once, in `server/options.py`), and a test names every bound it runs under.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# A call enters the queue in slices of at most this many inputs (or two batches' worth, if more); its next
# slice is prepared once fewer than a batch of its items are waiting.
SLICE_INPUTS = 64
# While a batch runs, the next one is formed this long before the running one should end: time enough to
# collate it, so the encoder is fed again at once.
FORM_LEAD_S = 0.002
# Most expected work in one batch led by a call with more than a batch queued.
TURN_S = 0.1


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_cost: int  # padded cost (items x largest item's cost) of one forward pass
    max_batch_items: int
    max_wait_s: float  # how long the oldest item may wait for company
    max_queue_items: int  # past this, new calls get RESOURCE_EXHAUSTED at once
    max_queue_wait_s: float  # past this much expected wait, new calls get RESOURCE_EXHAUSTED at once
    # Most padding a batch may carry, as a share of its padded cost (1 = no cap). The oldest item always goes;
    # an item that would push the batch past the cap waits for a batch nearer its own length.
    max_padding: float
    max_in_flight: int = 2  # batches formed or running at once (not a setting: one runs, the next is formed)

    def for_turn(self, rate: float, leader_cost: int) -> BatchPolicy:
        """The policy of a batch led by a call with more than a batch of work queued: turns must come round
        quickly, so it holds at most TURN_S of expected work at `rate` (cost per second; 0: not measured
        yet), and anyone arriving behind it waits no longer. On a GPU that is no limit; on a CPU it keeps a
        batch of long texts from holding everyone else for half a second."""
        cap = max(int(rate * TURN_S), leader_cost)
        if not rate or cap >= self.max_batch_cost:
            return self
        return dataclasses.replace(self, max_batch_cost=cap)
