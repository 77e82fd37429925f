"""Several server processes on one port: `headswap serve --workers N`.

One Python process has one event loop and one GIL: on a GPU it runs out of CPU (gRPC, protobuf, tokenizing,
batching) long before the accelerator does. With `--workers N` the command becomes a supervisor that starts
N copies of the same server (the same command line, so any launcher wrapping it works too). Each worker is a
whole server: its own backbone session, batcher, head bank and admission control. They share:

- **the gRPC port** (and the health port), through SO_REUSEPORT: the kernel spreads connections over the
  workers. The supervisor reserves the port first (port 0 picks one), so every worker binds the same one;
- **the store**: PostgreSQL as any set of replicas does; a local directory through `store/processes.py`
  (one writer at a time, a change log every worker follows): every swap reaches every worker through the
  same `reconcile` path;
- **one /metrics**: each worker serves its metrics on a loopback port of its own; the supervisor serves
  `--metrics-port` and answers a scrape with every worker's samples, each labelled `worker="i"`.

Why processes on one port rather than one backbone process fed by several front processes: each worker then
is exactly the single-process server that the tests hold to its behaviour, with nothing new between gRPC and
the backbone (no inter-process copy of token ids or embeddings), and a GPU takes several sessions at once
(docs/BENCHMARKS.md has the figures by worker count). The supervisor exports the default backbone before any
worker starts (once, not N times), restarts a worker that dies (with backoff), and on SIGTERM forwards it to
every worker, waits for their drains and exits 0 when all exited 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headswap.server.config import ServerConfig

log = logging.getLogger(__name__)

ENV_INDEX = "HEADSWAP_WORKER_INDEX"
ENV_COUNT = "HEADSWAP_WORKER_COUNT"
ENV_PORT = "HEADSWAP_WORKER_PORT"
ENV_DIR = "HEADSWAP_WORKER_DIR"
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def auto_workers(config: ServerConfig) -> int:
    """`--workers 0`: one on a machine without a GPU (a CPU's cores are the backbone's); on a GPU machine,
    enough processes to feed it (measured on an H200: docs/BENCHMARKS.md), within the CPUs there are."""
    if config.workers:
        return config.workers
    if config.device == "cpu" or not gpu_present():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(GPU_WORKERS, cpus // 2))


GPU_WORKERS = 4


def gpu_present() -> bool:
    try:
        import onnxruntime as ort

        from headswap.server.inference.onnx import CUDA, _cuda_device_present

        return CUDA in ort.get_available_providers() and _cuda_device_present()
    except Exception:
        return False


def worker_index() -> int | None:
    raw = os.environ.get(ENV_INDEX)
    return int(raw) if raw is not None else None


def as_worker(config: ServerConfig) -> ServerConfig:
    """The configuration a worker runs: the port the supervisor reserved (its metrics go to a loopback port of
    its own: `Server.start`)."""
    from dataclasses import replace

    return replace(config, port=int(os.environ[ENV_PORT]), workers=int(os.environ[ENV_COUNT]))


def report_metrics_port(port: int) -> None:
    """A worker tells the supervisor where its metrics are (a file the supervisor reads per scrape)."""
    directory, index = os.environ.get(ENV_DIR), worker_index()
    if directory and index is not None:
        target = Path(directory) / f"metrics-{index}"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(target)


# -- the supervisor ----------------------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) to host:port with SO_REUSEPORT, so that the workers can bind it too and
    nothing else takes it meanwhile; port 0 picks a free one."""
    bare = host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    if bare == "localhost":
        bare, family = "127.0.0.1", socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bare, port))
    return sock, int(sock.getsockname()[1])


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0


@dataclass
class Supervisor:
    config: ServerConfig
    count: int
    command: Sequence[str] = field(default_factory=lambda: [sys.executable, *sys.orig_argv[1:]])
    workers: list[_Worker] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> int:
        from headswap.server.backbones import backbone_dirs

        backbone_dirs(self.config)  # the default backbone exported once, before any worker starts
        sock, port = reserve_port(self.config.host, self.config.port)
        log.info("gRPC listening on port %d with %d workers (SO_REUSEPORT)", port, self.count)
        with tempfile.TemporaryDirectory(prefix="headswap-workers-") as tmp:
            metrics = None
            if self.config.metrics_port:
                metrics = MetricsMerger(Path(tmp), self.count)
                metrics.serve(self.config.metrics_port, self.config.host)
            env = {**os.environ, ENV_COUNT: str(self.count), ENV_PORT: str(port), ENV_DIR: tmp}
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
            self.workers = [_Worker(i) for i in range(self.count)]
            for worker in self.workers:
                self._start(worker, env)
            try:
                return self._watch(env)
            finally:
                if metrics is not None:
                    metrics.close()
                sock.close()

    def _start(self, worker: _Worker, env: dict[str, str]) -> None:
        worker.proc = subprocess.Popen(list(self.command), env={**env, ENV_INDEX: str(worker.index)})
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _watch(self, env: dict[str, str]) -> int:
        due: dict[int, float] = {}  # worker index -> when to restart it
        while not self.stopping.wait(0.1):
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.poll() is None:
                    continue
                if worker.index not in due:
                    # A worker that ran a while before dying starts again at the first backoff step.
                    if time.monotonic() - worker.started > 60:
                        worker.restarts = 0
                    delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
                    log.error(
                        "worker %d (pid %d) exited with %s; restarting it in %.0fs",
                        worker.index, proc.pid, proc.returncode, delay,
                    )  # fmt: skip
                    due[worker.index] = time.monotonic() + delay
                elif time.monotonic() >= due[worker.index]:
                    del due[worker.index]
                    worker.restarts += 1
                    self._start(worker, env)
        return self._stop()

    def _stop(self) -> int:
        log.info("draining: SIGTERM to %d workers", len(self.workers))
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + 10.0
        codes = []
        for proc in live:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        log.info("stopped")
        return 0 if all(code == 0 for code in codes) else 1


def run_supervisor(config: ServerConfig, count: int) -> int:
    return Supervisor(config, count).run()


# -- one /metrics for all workers ---------------------------------------------------------------------------


class MetricsMerger:
    """`--metrics-port` of a server with workers: every worker's samples, labelled `worker`, in one scrape."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self._http: object | None = None

    def ports(self) -> dict[int, int]:
        out = {}
        for i in range(self.count):
            try:
                out[i] = int((self.directory / f"metrics-{i}").read_text())
            except (OSError, ValueError):
                continue  # not started yet, or restarting
        return out

    def collect(self) -> Iterable[object]:
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, object] = {}
        for index, port in sorted(self.ports().items()):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as reply:
                    text = reply.read().decode()
            except OSError:
                continue  # a worker restarting: its samples are missing from this scrape only
            for family in text_string_to_metric_families(text):
                target = merged.setdefault(family.name, _empty_like(family))
                for sample in family.samples:
                    target.samples.append(  # type: ignore[attr-defined]
                        sample._replace(labels={**sample.labels, "worker": str(index)})
                    )
        return list(merged.values())

    def serve(self, port: int, host: str) -> int:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(self)  # type: ignore[arg-type]
        addr = host.strip("[]") if host not in ("[::]", "::", "0.0.0.0") else "::"
        server, _thread = start_http_server(port, addr=addr or "::", registry=registry)
        self._http = server
        bound = int(server.server_address[1])
        log.info("metrics of all workers on http://%s:%d/metrics", host or "*", bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            threading.Thread(target=self._http.shutdown, daemon=True).start()  # type: ignore[attr-defined]


def _empty_like(family: object) -> object:
    from prometheus_client.metrics_core import Metric

    source: Metric = family  # type: ignore[assignment]
    return Metric(source.name, source.documentation, source.type, source.unit)
