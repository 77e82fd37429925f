"""Unary gRPC calls at saturation from h2load (nghttp2's HTTP/2 load generator, written in C).

The Python load processes of `bench.load` share the machine's cores with the server they measure: on 2 cores
their event loop and gRPC threads take a third of a core at 2,000 calls/s, and each of their wake-ups can
preempt a server thread that holds its GIL. h2load sends the same calls for a few microseconds each, so that
what is measured is the server. gRPC over HTTP/2 is a POST of the message behind a 5-byte prefix with two
headers; h2load sends that body on every stream.

h2load reads HTTP statuses only (a gRPC error is an HTTP 200 with `grpc-status` in its trailers), so the calls
that count are the server's own: `headswap_requests_total` from its /metrics before and after, by code. A run
whose calls were not all OK reports the codes as errors.

    scripts/install-h2load   # Debian's nghttp2-client, once (root)
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.load import LoadResult

INSTALL = "scripts/install-h2load"
# The headers of a gRPC call. The deadline is what a client sets (the headswap client always does): the
# server keeps a timer for it, a cost a call without one would not show.
HEADERS = ("content-type: application/grpc", "te: trailers", "grpc-timeout: 60S")


def installed() -> bool:
    return shutil.which("h2load") is not None


def h2load_binary() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise FileNotFoundError(f"h2load is not installed: run {INSTALL} (as root)")
    return found


def grpc_frame(message: bytes) -> bytes:
    """A gRPC message on the wire: not compressed (0), its length (4 bytes, big-endian), the message."""
    return b"\0" + struct.pack(">I", len(message)) + message


def calls_by_code(metrics_url: str, rpc: str) -> dict[str, float]:
    """`headswap_requests_total` of one method by code, summed over a server's workers."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "headswap_requests":
            continue
        for sample in family.samples:
            if sample.name == "headswap_requests_total" and sample.labels.get("rpc") == rpc:
                code = sample.labels.get("code", "")
                out[code] = out.get(code, 0.0) + sample.value
    return out


def read_log(path: Path) -> list[float]:
    """Each request's time to its response (ms), from h2load's `--log-file` (start µs, status, duration µs)."""
    latencies = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2].strip():
            latencies.append(int(fields[2]) / 1000)
    return latencies


def run_h2load(
    target: str,
    metrics_url: str,
    method: str,
    message: bytes,
    seconds: float,
    *,
    connections: int = 8,
    streams: int = 8,
) -> LoadResult:
    """`connections` × `streams` calls of `method` ("/package.Service/Method") in flight for `seconds`, each
    carrying `message` (serialized). The calls counted are those the server says it finished during the run,
    by code; latencies are h2load's. The calls h2load cancels when its time is up (at most one per stream)
    are not errors: `LoadResult.late` counts them."""
    rpc = method.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="headswap-h2load-") as tmp:
        log = Path(tmp) / "log"
        before = calls_by_code(metrics_url, rpc)
        started = time.perf_counter()
        out = _h2load(target, method, message, seconds, connections, streams, log)
        elapsed = time.perf_counter() - started
        time.sleep(SETTLE_S)
        after = calls_by_code(metrics_url, rpc)
        latencies = read_log(log)
    counted = {code: after.get(code, 0.0) - before.get(code, 0.0) for code in after}
    ok = int(counted.pop("OK", 0.0))
    cut = int(counted.pop("CANCELLED", 0.0))
    errors = {code: int(n) for code, n in counted.items() if n > 0}
    if cut > connections * streams:  # more than the calls in flight at the end: cancelled for another reason
        errors["CANCELLED"] = cut
    if ok == 0:
        raise RuntimeError(f"the server counted no {rpc} call OK during h2load's run ({errors}):\n{out}")
    # h2load's own clock for the window where it gives one (without its start-up).
    window = _duration(out) or min(elapsed, seconds)
    return LoadResult(calls=ok, inputs=ok, errors=errors, latencies_ms=latencies, seconds=window, late=cut)


def warm_up(
    target: str, method: str, message: bytes, seconds: float = 1.0, connections: int = 8, streams: int = 8
) -> None:
    """The same calls for `seconds`, unmeasured (connections, the server's first calls), then a pause for the
    calls cut at its end to finish."""
    _h2load(target, method, message, seconds, connections, streams, None)
    time.sleep(SETTLE_S)


# After a run, for the calls h2load cancelled at its end to be finished (and counted) by the server.
SETTLE_S = 0.5


def _h2load(
    target: str, method: str, message: bytes, seconds: float, connections: int, streams: int, log: Path | None
) -> str:
    with tempfile.TemporaryDirectory(prefix="headswap-h2load-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(grpc_frame(message))
        command = [h2load_binary(), f"--clients={connections}", f"--max-concurrent-streams={streams}"]
        command += ["--threads=1", f"--duration={round(seconds * 1000)}ms", f"--data={body}"]
        command += [f"--header={h}" for h in HEADERS]
        command += [f"--log-file={log}"] if log else []
        command.append(f"http://{target}{method}")
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def _duration(summary: str) -> float | None:
    """The run's length from h2load's "finished in 8.00s, ..." line."""
    for line in summary.splitlines():
        if line.startswith("finished in "):
            value = line.split()[2].rstrip(",")
            for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
                if value.endswith(unit):
                    return float(value[: -len(unit)]) * scale
    return None


__all__ = [
    "HEADERS",
    "calls_by_code",
    "grpc_frame",
    "h2load_binary",
    "installed",
    "read_log",
    "run_h2load",
    "warm_up",
]
