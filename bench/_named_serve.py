"""`headswap serve` with every thread named after its job, for per-thread CPU accounting from /proc.

Python 3.11 does not give its threads OS-level names, and threads made by native code (ONNX Runtime's
intra-op pool, the tokenizers crate's rayon pool) inherit the name of the thread that created them. So
before the server starts, this launcher:

- names each Python thread at start after `Thread.name` (`headswap-preprocess_0`, `headswap-backbone-text_0`,
  `headswap-io_0`, `headswap-train_0`, ...);
- creates the rayon pool from a thread named `rayon-tokenize` (one throwaway `encode_batch`);
- creates every ONNX Runtime session while the creating thread is named `ort-intra-op`.

Nothing else changes: the server code and its flags are the ones `headswap serve` runs. Diagnostics only
(`python -m bench.embed_throughput --profile`, and the profile runs of `python -m bench.classify_latency`); the
measured figures come from the plain `headswap serve`.

Two opt-in extras, for diagnosis too:

- HEADSWAP_BENCH_BATCH_LOG=FILE: one line per backbone forward pass (`items longest real_tokens seconds`),
  written by a wrapper around `Backbone.run_ids`, so batch sizes and padding can be read afterwards;
- HEADSWAP_BENCH_ORT_SPINNING=0: sessions are made with `session.intra_op.allow_spinning=0` (a what-if for
  the server's ONNX Runtime options; clearly not what `headswap serve` does today).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any

_PR_SET_NAME = 15
_PR_GET_NAME = 16
_libc = ctypes.CDLL(None, use_errno=True)


def set_os_thread_name(name: str) -> None:
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def get_os_thread_name() -> str:
    buffer = ctypes.create_string_buffer(16)
    _libc.prctl(_PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode(errors="replace")


def _patch_threads() -> None:
    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        set_os_thread_name(self.name.replace("headswap-", "hs-"))
        original_run(self)

    threading.Thread.run = run  # type: ignore[method-assign]


def _patch_onnxruntime() -> None:
    import onnxruntime as ort

    original_init = ort.InferenceSession.__init__

    spinning = os.environ.get("HEADSWAP_BENCH_ORT_SPINNING")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if spinning is not None:
            options = kwargs.get("sess_options") or (args[1] if len(args) > 1 else None)
            if options is None:
                options = kwargs["sess_options"] = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        before = get_os_thread_name()
        set_os_thread_name("ort-intra-op")
        try:
            original_init(self, *args, **kwargs)
        finally:
            set_os_thread_name(before)

    ort.InferenceSession.__init__ = init  # type: ignore[method-assign]


def _start_rayon_pool() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    before = get_os_thread_name()
    set_os_thread_name("rayon-tokenize")
    try:
        # Enough inputs that rayon really spreads them over its (global, created once) pool.
        tok.encode_batch(["a a a"] * 256)
    finally:
        set_os_thread_name(before)


def _log_batches(path: str) -> None:
    from headswap.server.inference.onnx import OnnxEncoder

    original = OnnxEncoder.run
    log = open(path, "a", buffering=1)  # line-buffered, open for the life of the process

    def run(self: OnnxEncoder, feeds: Any, spare_core: bool = False) -> Any:
        t0 = time.perf_counter()
        out = original(self, feeds, spare_core)
        seconds = time.perf_counter() - t0
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        log.write(f"{ids.shape[0]} {ids.shape[1]} {int(mask.sum())} {seconds:.6f}\n")
        return out

    OnnxEncoder.run = run  # type: ignore[method-assign]


def main() -> int:
    _patch_threads()
    if os.environ.get("HEADSWAP_BENCH_BATCH_LOG"):
        _log_batches(os.environ["HEADSWAP_BENCH_BATCH_LOG"])
    _patch_onnxruntime()
    _start_rayon_pool()
    set_os_thread_name("main-loop")
    from headswap.client.cli import main as cli_main

    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
