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


def limit_blas_threads() -> None:
    """Hold numpy's BLAS (OpenBLAS) to one thread in this process.

    The server's numpy products are small (the head stage: a batch's rows times a head's weights and stored
    examples, adapters/host_scoring.py) and run in threads that already have a core each. OpenBLAS would
    split them over a pool of its own, whose threads then spin waiting for the next product on the cores
    ONNX Runtime's forward pass needs: measured on 2 cores, single-text Classify fell to 0.80x of the code
    before the change that moved the head stage to numpy, and came back to 1.13x with one BLAS thread
    (docs/BENCHMARKS.md, "CPU serving beside the code before the GPU work"). PyTorch keeps its own threads
    (`--train-threads`)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
