"""Logging set-up: plain text for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

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


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OwnRecords(level.upper() == "DEBUG"))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        where = f" [worker {WORKER}]" if WORKER else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
