"""`bench.gpu`'s headswap runs: servers with W workers, Embed and Classify loads (py-spy on a worker with
`--profile`), AdaptHead on cached embeddings and the head's fit alone."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench._gpu_workload import Results, ort_peer, st_peer, workloads
from bench.common import SATURATION_FLAGS, LatencySummary, machine
from bench.data import data_root, read_banking77
from bench.load import LoadResult, LoadSpec, run_load
from bench.serving import source_version


@contextmanager
def server(
    backbone: Path,
    flags: Sequence[str],
    *,
    module: str = "headswap.client.cli",
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[Any]:
    from headswap.server.testing import ServerProcess

    proc = ServerProcess(
        "--backbone", str(backbone), *SATURATION_FLAGS, *flags, module=module, env=env, log_path=log_path
    )
    try:
        yield proc.wait_serving(600)
    finally:
        if proc.proc.poll() is None:
            proc.terminate(120)


def wait_all_workers(proc: Any, workers: int, timeout: float = 600.0) -> None:
    """`wait_serving` answers once one worker serves; a measurement wants all of them."""
    deadline = time.monotonic() + timeout
    while proc.log().count("SERVING on port") < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every worker served after {timeout:.0f}s:\n{proc.log()[-3000:]}")
        time.sleep(0.2)


def load_summary(result: LoadResult) -> dict[str, Any]:
    lat = LatencySummary.of(result.latencies_ms) if result.latencies_ms else None
    out: dict[str, Any] = {
        "inputs_per_s": round(result.inputs_per_s),
        "calls_per_s": round(result.calls_per_s),
        "p50_ms": round(lat.p50_ms, 2) if lat else None,
        "p99_ms": round(lat.p99_ms, 2) if lat else None,
        "errors": result.errors,
        "late": result.late,
    }
    if result.server_ms:  # where a call's time went: inside the server (by stage) or outside it
        server = LatencySummary.of(result.server_ms)
        out["server_p50_ms"] = round(server.p50_ms, 2)
        out["server_p99_ms"] = round(server.p99_ms, 2)
        out["server_mean_stage_ms"] = {
            k: round(v / len(result.server_ms), 3) for k, v in result.stages_ms.items()
        }
    return out


def train_tenant(target: str, tenant: str, count: int = 400) -> None:
    from headswap.client import Client

    rows = read_banking77(data_root())[:count]
    with Client(target, timeout=600) as hs:
        hs.adapt_head(tenant, [t for t, _ in rows], [label for _, label in rows], validation_fraction=0)


@contextmanager
def profiled(server_pid: int, name: str, seconds: float, delay: float = 0.0) -> Iterator[None]:
    """py-spy on one server process (the first worker's, with workers) for `seconds` from `delay` seconds
    into the block (a load's window opens once its processes have started: `load_delay`), when py-spy is
    installed and --profile asked for it: raw folded stacks per thread, in $OUT (or the temp dir)."""
    spy = shutil.which("py-spy") if PROFILE else None
    if spy is None:
        yield
        return
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    pids = children.read_text().split() if children.exists() else []
    target = int(pids[0]) if pids else server_pid
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / f"profile-{name}.txt"
    command = [spy, "record", "-p", str(target), "-d", str(max(1, int(seconds))), "-r", "200", "-f", "raw",
               "--threads", "--nonblocking", "-o", str(out)]  # fmt: skip
    started: list[subprocess.Popen[bytes]] = []
    timer = threading.Timer(
        delay,
        lambda: started.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ),
    )
    timer.start()
    try:
        yield
    finally:
        timer.join()
        for proc in started:
            try:
                proc.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()


def load_delay(clients: int) -> float:
    """When a load's window opens after `run_load` is called (bench/load.py starts its processes first)."""
    return 3.0 + 0.2 * clients + 0.5


PROFILE = False


def embed_loads(
    target: str,
    texts: dict[str, list[str]],
    clients: int,
    seconds: float,
    sizes: Sequence[int] = (256, 32),
    pid: int = 0,
    tag: str = "",
) -> dict[str, Any]:
    out = {}
    for name, workload in texts.items():
        for size in sizes if name == "short" else sizes[:1]:
            spec = LoadSpec(
                target,
                "embed",
                workload,
                request_size=size,
                concurrency=max(2, 16 * 32 // size // clients),
                seconds=seconds,
                client="raw",
                connections=4,
            )
            with (
                profiled(pid, f"embed-{name}-r{size}-{tag}", seconds - 2) if pid else contextlib.nullcontext()
            ):
                out[f"{name}_r{size}"] = load_summary(run_load(spec, clients))
    return out


def classify_loads(
    target: str, texts: list[str], clients: int, seconds: float, rates: Sequence[float], pid: int = 0
) -> dict[str, Any]:
    out = {}
    for rate in rates:
        spec = LoadSpec(
            target,
            "classify_rate",
            texts,
            rate=rate,
            concurrency=512,
            seconds=seconds,
            tenant="bench",
            client="raw",
            connections=4,
        )
        out[f"rate_{int(rate)}"] = load_summary(run_load(spec, clients))
    spec = classify_saturation(target, texts, seconds, connections=4)
    with (
        profiled(pid, "classify-saturation", seconds - 1, load_delay(clients))
        if pid
        else contextlib.nullcontext()
    ):
        out["saturation"] = load_summary(run_load(spec, clients))
    return out


def adapt_figures(target: str, out: Results, count: int = 10000, pid: int = 0) -> None:
    """AdaptHead on 10,000 examples: once to embed them, then again on the cached embeddings."""
    from headswap.client import Client

    rows = read_banking77(data_root())[:count]
    texts, labels = [t for t, _ in rows], [label for _, label in rows]
    with Client(target, timeout=600) as hs:
        t0 = time.perf_counter()
        hs.adapt_head("adapt", texts, labels, replace=True)
        first = time.perf_counter() - t0
        figures = {"examples": len(rows), "first_call_s": round(first, 3)}
        for name, options in (("defaults", {}), ("validation_fraction_0", {"validation_fraction": 0.0})):
            times = []
            with profiled(pid, f"adapt-{name}", 2.5) if pid else contextlib.nullcontext():
                for _ in range(3):
                    t0 = time.perf_counter()
                    hs.adapt_head("adapt", texts, labels, replace=True, force_activate=True, **options)  # type: ignore[arg-type]
                    times.append(time.perf_counter() - t0)
            figures[f"cached_{name}_s"] = round(min(times), 3)
    out.put("adapt_head_10k", figures)


def banking77_embeddings(target: str, count: int = 10000) -> tuple[np.ndarray, np.ndarray, int]:
    """10,000 Banking77 training texts embedded by the server, with their label indices."""
    from headswap.client import Client

    rows = read_banking77(data_root())[:count]
    labels = sorted({label for _, label in rows})
    y = np.array([labels.index(label) for _, label in rows], dtype=np.int64)
    with Client(target, timeout=600) as hs:
        x = np.concatenate([hs.embed([t for t, _ in rows[i : i + 512]]) for i in range(0, len(rows), 512)])
    return x.astype(np.float32), y, len(labels)


def fit_alone(out: Results, x: np.ndarray, y: np.ndarray, classes: int) -> None:
    """The head's fit (model selection included) alone, on the GPU and on the CPU, on real embeddings."""
    import torch

    from headswap.adapters import TrainConfig, train_head

    figures = {}
    for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        runs = 2 if device == "cuda" else 1  # the CPU's figure is there to compare with, once is enough
        if device == "cuda":
            train_head(
                x, y, classes, TrainConfig(device=device, validation_fraction=0.0)
            )  # kernels, allocator
        for name, fraction in (("defaults", None), ("validation_fraction_0", 0.0)):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                train_head(x, y, classes, TrainConfig(device=device, validation_fraction=fraction))
                times.append(time.perf_counter() - t0)
            figures[f"{device}_{name}_s"] = round(min(times), 3)
    out.put("train_head_10k_alone", figures)


def bucket_log(log: str) -> dict[str, Any]:
    import re

    found = re.search(r"(\d+) shape buckets warmed up in ([\d.]+)s", log)
    return {"shapes": int(found.group(1)), "seconds": float(found.group(2))} if found else {}


def gpu_run(args: argparse.Namespace, out: Results) -> None:
    texts = workloads(args.backbone / "tokenizer.json", args.quick)
    seconds = 3.0 if args.quick else args.seconds
    out.put("machine", machine(args.accelerator).describe())
    out.put("source", args.source or source_version())
    try:
        import onnxruntime as ort

        out.put("onnxruntime", ort.__version__)
    except ImportError:
        pass
    if not args.skip_peers:
        ort_peer(args.backbone, texts, out, seconds)
        if args.st_model is not None and args.st_model.exists():
            st_peer(args.st_model, texts, out, seconds)
    embed_workers = args.embed_workers or args.workers
    classify_workers = args.classify_workers or args.workers[-1:]
    profile_workers = args.profile_workers or args.workers[-1:]
    x = y = None
    classes = 0
    for workers in args.workers:
        flags = ["--precision", args.precision, "--workers", str(workers)]
        pid_for = lambda pid, w=workers: pid if w in profile_workers else 0  # noqa: E731
        with tempfile.TemporaryDirectory(prefix="headswap-gpu-") as tmp:
            with server(args.backbone, flags, log_path=Path(tmp) / "server.log") as proc:
                wait_all_workers(proc, workers)
                if workers in embed_workers:
                    figures: dict[str, Any] = {"buckets": bucket_log(proc.log())}
                    figures.update(
                        embed_loads(
                            proc.target,
                            texts,
                            args.clients,
                            seconds,
                            pid=pid_for(proc.pid),
                            tag=f"w{workers}",
                        )
                    )
                    out.put(f"headswap_embed_workers_{workers}", figures)
                if workers in classify_workers:
                    train_tenant(proc.target, "bench")
                    time.sleep(0.5)  # every worker has the head (the change log is followed every 20 ms)
                    classified = classify_loads(
                        proc.target, texts["short"], args.clients, seconds, args.rates, pid=pid_for(proc.pid)
                    )
                    out.put(f"headswap_classify_workers_{workers}", classified)
                if workers == args.workers[-1]:
                    count = 2000 if args.quick else 10000
                    adapt_figures(proc.target, out, count, pid=pid_for(proc.pid))
                    x, y, classes = banking77_embeddings(proc.target, count)
                    out.put("server_log_tail", proc.log()[-4000:])
    if x is not None and y is not None:
        fit_alone(out, x, y, classes)


def classify_saturation(target: str, texts: list[str], seconds: float, connections: int = 1) -> LoadSpec:
    """Single-text Classify to the tenant "bench" in a closed loop, 64 callers per load process."""
    return LoadSpec(
        target,
        "classify_closed",
        texts,
        concurrency=64,
        seconds=seconds,
        tenant="bench",
        client="raw",
        connections=connections,
    )
