"""The server's thread pools, one per kind of blocking work (see `Pools`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Pools:
    """Blocking work never runs on the event loop: each kind has its own threads."""

    preprocess: ThreadPoolExecutor  # tokenizing, image decoding
    io: ThreadPoolExecutor  # store reads and writes, head loading
    train: ThreadPoolExecutor  # head training, never on the threads that serve
    # One thread per backbone: each encoder runs one batch at a time (a text and an image batch run at once).
    backbones: list[ThreadPoolExecutor] = field(default_factory=list)

    def backbone(self, name: str) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"headswap-backbone-{name}")
        self.backbones.append(pool)
        return pool

    def shutdown(self) -> None:
        for pool in (self.preprocess, self.io, self.train, *self.backbones):
            pool.shutdown(wait=False, cancel_futures=True)
