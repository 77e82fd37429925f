"""Logging set-up: plain text for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

# Set in the processes of a server with several workers (server/workers.py): their lines say which.
WORKER = os.environ.get("HEADSWAP_WORKER_INDEX", "")


ACCESS = "headswap.access"


class _PerSecond:
    """A time's text to the second, made again only when the second changes: the access log's direct line
    (`Handler.access_ok`) would otherwise format the same second for every call in it."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self.fmt, self.convert = fmt, convert
        self._second, self._text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.fmt, self.convert(second))
        return self._text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = _PerSecond("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def access_line(self, created: float, msecs: int, message: str, fields: dict[str, object]) -> str:
        """What `format` makes of the access log's INFO record (`message`, `fields` its extra) at `created`."""
        entry = _entry(f"{self._stamp(created)}.{msecs:03d}Z", "INFO", ACCESS, message)
        entry.update(fields)
        return json.dumps(entry)

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        entry = _entry(ts, record.levelname, record.name, record.getMessage())
        for key in ("request_id", "rpc", "code", "duration_ms", "tenant"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _entry(ts: str, level: str, logger: str, message: str) -> dict[str, object]:
    entry: dict[str, object] = {"ts": ts, "level": level, "logger": logger, "msg": message}
    if WORKER:
        entry["worker"] = int(WORKER)
    return entry


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


class TextFormatter(logging.Formatter):
    """Lines for people: time, level, [worker], logger, message."""

    def __init__(self) -> None:
        where = f" [worker {WORKER}]" if WORKER else ""
        super().__init__(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
        self.prefix = f" INFO{where} {ACCESS}: "
        self._stamp = _PerSecond(self.default_time_format, self.converter)

    def access_line(self, created: float, msecs: int, message: str, fields: dict[str, object]) -> str:
        """What `format` makes of the access log's INFO record (`message`) at `created`."""
        return f"{self._stamp(created)},{msecs:03d}{self.prefix}{message}"


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
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._hold(self.format(record), record.name != ACCESS or record.levelno > logging.INFO)
        except RecursionError:
            raise
        except Exception:
            self._lines, self._bytes = [], 0
            self.handleError(record)

    def access_ok(self, message: str, fields: dict[str, object]) -> None:
        """The access log's INFO line, as `emit` would hold it for the record of `message` and `fields`,
        made without the record (`direct_access` says when that is the same). A LogRecord and its way through
        the logger, the filter and the formatter cost a busy server about a tenth of a single-text Classify
        (free encoder, 2 cores: docs/BENCHMARKS.md); this costs a few microseconds."""
        created = time.time()
        formatter: TextFormatter | JsonFormatter = self.formatter  # type: ignore[assignment]
        line = formatter.access_line(created, int((created - int(created)) * 1000), message, fields)
        with self.lock:  # type: ignore[union-attr]
            self._hold(line, False)

    def _hold(self, line: str, now: bool) -> None:
        line += self.terminator
        self._lines.append(line)
        self._bytes += len(line)
        if now or self._bytes >= self.max_bytes:
            self._write()
        elif self._flusher is None:
            self._flusher = threading.Thread(target=self._tick, name="headswap-log-flush", daemon=True)
            self._flusher.start()

    def _write(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines, self._bytes = [], 0
            self.stream.write(text)
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stopping.wait(self.delay_s):
            if self._lines:
                self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write()
            except Exception:  # a stream closed under us (interpreter exit): nothing left to write to
                self._lines, self._bytes = [], 0

    def close(self) -> None:
        self._stopping.set()
        self.flush()
        super().close()


def configure(level: str, fmt: str) -> None:
    handler = Handler(sys.stderr)
    handler.addFilter(OwnRecords(level.upper() == "DEBUG"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def direct_access(access: logging.Logger) -> Handler | None:
    """The handler whose `access_ok` writes the access log's INFO line as logging would, when logging would
    give that record to it alone, unchanged: the logger passes INFO on to the root, whose one handler is
    `configure`'s (its filter passes every headswap record). Anything else set up (a test's capturing
    handler, a filter, another handler) gets the record the usual way."""
    handlers = logging.root.handlers
    if (
        not access.isEnabledFor(logging.INFO)
        or len(handlers) != 1
        or access.handlers
        or access.filters
        or not access.propagate
    ):
        return None
    handler = handlers[0]
    if not isinstance(handler, Handler) or not isinstance(handler.formatter, (TextFormatter, JsonFormatter)):
        return None
    if len(handler.filters) != 1 or not isinstance(handler.filters[0], OwnRecords) or logging.root.filters:
        return None
    return handler
