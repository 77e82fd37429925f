"""Load from several client processes: Embed in a closed loop, Classify at a fixed rate or at saturation.

One Python process with one event loop cannot produce more than a few thousand calls a second, so a driver
starts `processes` copies of this module (`python -m bench.load SPEC.json`), each with its own event loop and
channel, all measuring the same window (they start together at `start_at`, wall clock). Each prints one JSON
line: what it completed inside the window and its latencies. `run_load` merges them.

Closed loop (`embed`, `classify_closed`): `concurrency` callers per process, each sending its next call when
the last returns; every call started inside the window counts, and the window is stretched to when the last
of them ends. (Counting only the calls that end inside it would penalise a server that takes turns between
callers: calls long against the window all end together, and the window would see a wave of them less.) Open loop (`classify_rate`): calls are sent at fixed times (`rate` per second over all
processes) whatever the replies do, and a call's latency counts from when it was due, so a server that falls
behind shows it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headswap.server import loops


@dataclass(frozen=True)
class LoadSpec:
    target: str
    mode: str  # "embed" | "classify_closed" | "classify_rate"
    texts: list[str]
    request_size: int = 1
    concurrency: int = 32  # callers per process (closed loop) or most calls in flight (open loop)
    rate: float = 0.0  # calls per second, this process's share (open loop)
    seconds: float = 10.0
    start_at: float = 0.0  # wall-clock time at which the window opens (time.time())
    tenant: str = ""  # Classify's tenant; several, comma-separated, are called in turn
    seed: int = 0
    connections: int = 1  # TCP connections per process, callers spread over them
    # "headswap": the AsyncClient, end to end (request building, numpy results). "raw": requests serialized
    # before the window and replies left as bytes, so a Python client costs as little as one can and the
    # figure is what the server carries.
    client: str = "headswap"


@dataclass
class LoadResult:
    calls: int = 0
    inputs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    late: int = 0  # open loop: calls that could not even be sent on time (the client was the limit)
    # raw client: the server's own timings of each call (ms): from arrival to reply, and its stages
    server_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, float] = field(default_factory=dict)  # summed over calls, by stage

    def merge(self, other: LoadResult) -> None:
        self.calls += other.calls
        self.inputs += other.inputs
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.latencies_ms.extend(other.latencies_ms)
        self.seconds = max(self.seconds, other.seconds)
        self.late += other.late
        self.server_ms.extend(other.server_ms)
        for stage, ms in other.stages_ms.items():
            self.stages_ms[stage] = self.stages_ms.get(stage, 0.0) + ms

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


async def _drive(spec: LoadSpec) -> LoadResult:
    import grpc
    from grpc import aio

    from headswap.client import AsyncClient

    class OwnConnection(AsyncClient):
        """A client with a TCP connection of its own (gRPC shares one between equal channels by default):
        workers that share a port (SO_REUSEPORT) are balanced per connection, as many callers would be."""

        @staticmethod
        def _connect(target: str, credentials: Any, options: list[tuple[str, Any]]) -> Any:
            return aio.insecure_channel(target, options=[*options, ("grpc.use_local_subchannel_pool", 1)])

    result = LoadResult()
    tenants = spec.tenant.split(",")
    texts = spec.texts
    n = len(texts)
    # `connections` channels per process, callers spread over them; gRPC multiplexes callers on each.
    clients = [OwnConnection(spec.target, timeout=60.0) for _ in range(max(1, spec.connections))]
    try:
        # Warm each connection (TCP, HTTP/2, first call) before the window.
        for hs in clients:
            await hs.embed(texts[:1]) if spec.mode == "embed" else await hs.classify(tenants[0], texts[:1])
        delay = spec.start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        start = time.perf_counter()
        end = start + spec.seconds

        method = "Embed" if spec.mode == "embed" else "Classify"
        raw_calls = [
            hs._channel.unary_unary(f"/headswap.v1.HeadswapService/{method}") for hs in clients
        ]  # no serializers: bytes in, bytes out
        prebuilt = (
            [_request_bytes(spec, k * spec.request_size) for k in range(256)] if spec.client == "raw" else []
        )

        from headswap.v1 import headswap_pb2 as pb

        reply_type = pb.EmbedResponse if spec.mode == "embed" else pb.ClassifyResponse

        async def one(hs: Any, offset: int) -> int:
            if spec.client == "raw":
                call = raw_calls[clients.index(hs)]
                reply = await call(
                    prebuilt[(offset // max(1, spec.request_size)) % len(prebuilt)], timeout=60.0
                )
                if spec.mode != "embed":  # a Classify reply is small: read the server's timings
                    t = reply_type.FromString(reply).timings
                    result.server_ms.append(t.total_us / 1000)
                    for stage in ("queue", "preprocess", "backbone", "head"):
                        ms = getattr(t, f"{stage}_us") / 1000
                        result.stages_ms[stage] = result.stages_ms.get(stage, 0.0) + ms
                return spec.request_size
            batch = [texts[(offset + i) % n] for i in range(spec.request_size)]
            if spec.mode == "embed":
                await hs.embed(batch)
            else:
                await hs.classify(tenants[offset % len(tenants)], batch)
            return len(batch)

        def record_error(exc: BaseException) -> None:
            code = getattr(exc, "code", None)
            name = code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__
            result.errors[name] = result.errors.get(name, 0) + 1

        if spec.mode in ("embed", "classify_closed"):

            async def caller(k: int) -> None:
                offset = (spec.seed * 7919 + k * 104729) % max(1, n)
                hs = clients[k % len(clients)]
                while True:
                    t0 = time.perf_counter()
                    if t0 >= end:
                        return
                    try:
                        done = await one(hs, offset)
                    except Exception as exc:
                        record_error(exc)
                        continue
                    t1 = time.perf_counter()
                    result.calls += 1
                    result.inputs += done
                    result.latencies_ms.append((t1 - t0) * 1000)
                    last[0] = max(last[0], t1)
                    offset += spec.request_size

            last = [end]
            await asyncio.gather(*(caller(k) for k in range(spec.concurrency)))
            result.seconds = last[0] - start
        else:
            interval = 1.0 / spec.rate
            in_flight: set[asyncio.Task[None]] = set()
            slots = asyncio.Semaphore(spec.concurrency)

            async def timed(due: float, offset: int) -> None:
                try:
                    done = await one(clients[offset % len(clients)], offset)
                except Exception as exc:
                    record_error(exc)
                    return
                finally:
                    slots.release()
                t1 = time.perf_counter()
                if t1 <= end + 5.0:
                    result.calls += 1
                    result.inputs += done
                    result.latencies_ms.append((t1 - due) * 1000)

            k = 0
            while True:
                due = start + k * interval
                if due >= end:
                    break
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > 0.005:
                    result.late += 1
                await slots.acquire()
                task = asyncio.create_task(timed(due, spec.seed * 7919 + k))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                k += 1
            if in_flight:
                await asyncio.wait(in_flight, timeout=10.0)
            result.seconds = spec.seconds
    finally:
        for hs in clients:
            await hs.close()
    return result


def _request_bytes(spec: LoadSpec, offset: int) -> bytes:
    from headswap.client import _codec

    texts = [spec.texts[(offset + i) % len(spec.texts)] for i in range(spec.request_size)]
    if spec.mode == "embed":
        return bytes(_codec.embed_request(texts, None, "float32", "").SerializeToString())
    tenants = spec.tenant.split(",")
    tenant = tenants[(offset // max(1, spec.request_size)) % len(tenants)]
    return bytes(_codec.classify_request(tenant, texts, None, 1, 0, 0.0).SerializeToString())


def run_load(spec: LoadSpec, processes: int, *, python: str = sys.executable) -> LoadResult:
    """`processes` copies of this module with `spec` (the rate split between them); the merged result."""
    start_at = (
        time.time() + 3.0 + 0.2 * processes
    )  # time for every process to import and connect (bench.gpu's load_delay)
    share = spec.rate / processes if spec.rate else 0.0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = []
    with tempfile.TemporaryDirectory(prefix="headswap-load-") as tmp:
        for i in range(processes):
            one = LoadSpec(**{**asdict(spec), "rate": share, "start_at": start_at, "seed": i})
            (Path(tmp) / f"{i}.json").write_text(json.dumps(asdict(one)))
            procs.append(
                subprocess.Popen(
                    [python, "-m", "bench.load", str(Path(tmp) / f"{i}.json")],
                    stdout=(Path(tmp) / f"{i}.out").open("w"),
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        merged = LoadResult()
        for i, proc in enumerate(procs):
            proc.wait(timeout=spec.seconds + 120)
            out = (Path(tmp) / f"{i}.out").read_text()
            if proc.returncode != 0:
                raise RuntimeError(f"load process failed ({proc.returncode}):\n{out[-3000:]}")
            merged.merge(LoadResult(**json.loads(out.strip().splitlines()[-1])))
    return merged


def main() -> None:
    spec = LoadSpec(**json.loads(Path(sys.argv[1]).read_text()))
    # The load shares the machine with the server it measures: it runs on uvloop where installed (about a
    # tenth less CPU a call than asyncio's loop), whatever server it drives, today's or an older checkout.
    result = loops.run(_drive(spec))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()


__all__ = ["LoadResult", "LoadSpec", "run_load"]
