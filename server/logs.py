"""Logging set-up: plain text for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import TextIO

# Set in the processes of a server with several workers (server/workers.py): their lines say which.
WORKER = os.environ.get("HEADSWAP_WORKER_INDEX", "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if WORKER:
            entry["worker"] = int(WORKER)
        for key in ("request_id", "rpc", "code", "duration_ms", "tenant"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Warnings from libraries that ask nothing of the user: ONNX Runtime's quantiser advises pre-processing,
# which the export's recipe does not need (server/export/quantize.py).
QUIET = ("Please consider to run pre-processing before quantization",)


class OwnRecords(logging.Filter):
    """At INFO and above, what headswap says and libraries' warnings; libraries' INFO (ONNX Runtime's fusion
    notes: a dozen lines per export) only at DEBUG."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name.startswith("headswap"):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not any(str(record.msg).startswith(text) for text in QUIET)


ACCESS = "headswap.access"


class Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Every record on one stream, in the order logged. The access log's line for a call that went well (INFO)
    waits, up to `delay_s` or `max_bytes`, to be written with the lines after it in one write; any other
    record writes it and everything before it at once.

    One write a call cost more than the line itself: the write lets go of the GIL, and on a busy server the
    threads waiting for it (the backbone's, gRPC's poller) wake for each one. Measured with the free encoder
    on 2 cores: single-text Classify, 1,360 calls/s with a write per call, about 1,500 with none at all
    (docs/BENCHMARKS.md, "The pipeline's ceiling"). A process killed outright loses at most `delay_s` of
    access lines; a server that stops or drains writes them (logging.shutdown flushes every handler)."""

    def __init__(self, stream: TextIO, delay_s: float = 0.25, max_bytes: int = 64 * 1024) -> None:
        super().__init__(stream)
        self.delay_s = delay_s
        self.max_bytes = max_bytes
        self._lines: list[str] = []
        self._bytes = 0
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = self.format(record) + self.terminator
            self._lines.append(line)
            self._bytes += len(line)
            if record.name != ACCESS or record.levelno > logging.INFO or self._bytes >= self.max_bytes:
                self._write()
            elif self._flusher is None:
                self._flusher = threading.Thread(target=self._tick, name="headswap-log-flush", daemon=True)
                self._flusher.start()
        except RecursionError:
            raise
        except Exception:
            self._lines, self._bytes = [], 0
            self.handleError(record)

    def _write(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines, self._bytes = [], 0
            self.stream.write(text)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._closed.wait(self.delay_s):
            if self._lines:
                self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write()
            except Exception:  # a stream closed under us (interpreter exit): nothing left to write to
                self._lines, self._bytes = [], 0

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()


def configure(level: str, fmt: str) -> None:
    handler = Handler(sys.stderr)
    handler.addFilter(OwnRecords(level.upper() == "DEBUG"))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        where = f" [worker {WORKER}]" if WORKER else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
