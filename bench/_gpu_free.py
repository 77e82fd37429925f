"""`bench.gpu --fake-encoder` and `--cpu`: the pipeline on a CPU beside a baseline commit's server, with the
CPU time each took."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import h2load
from bench._gpu_serving import classify_saturation, load_summary, server, train_tenant, wait_all_workers
from bench._gpu_workload import Results, workloads
from bench.common import REPO, machine
from bench.load import LoadResult, LoadSpec, _request_bytes, run_load
from bench.serving import source_version
from headswap.server.testing import free_port


def compatible_backbone(backbone: Path, package: Path, into: Path) -> Path:
    """`backbone` as the server of an older commit reads it: its manifest without the fields that commit's
    `BackboneManifest` does not know (a newer export writes more; older code refused unknown fields), the
    models linked, not copied."""
    import re

    source = (package / "server" / "manifest.py").read_text()
    body = source[source.index("class BackboneManifest") :]
    known = set(re.findall(r"^    (\w+): ", body, flags=re.M))
    into.mkdir(parents=True, exist_ok=True)
    for entry in backbone.iterdir():
        if entry.name != "manifest.json":
            (into / entry.name).symlink_to(entry.resolve())
    manifest = json.loads((backbone / "manifest.json").read_text())
    (into / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k in known}))
    return into


@contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """A `headswap` package of commit `rev`, importable by putting the returned path first on sys.path."""
    with tempfile.TemporaryDirectory(prefix="headswap-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            package = Path(tmp) / "path" / "headswap"
            package.mkdir(parents=True)
            for name, source in (("server", "server"), ("client", "client"), ("adapters", "adapters")):
                (package / name).symlink_to(tree / source)
            (package / "v1").symlink_to(tree / "proto" / "headswap" / "v1")
            yield Path(tmp) / "path"
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


# TCP connections each load process opens (its callers spread over them), for every system alike. Workers
# that share a port (SO_REUSEPORT) are handed connections, not calls: over one connection every call went to
# one worker, so a "2 workers" figure measured one (every free run before 2026-12-07 20:13 UTC).
CONNECTIONS = 8

# --gpu-batching: the batcher's bounds on a GPU (server/config.py: 256 inputs, 65,536 padded tokens a forward
# pass), for every system alike (the baseline takes the same flags). The CPU's 16 inputs suit a CPU encoder's
# caches; with the encoder taken out, the GPU's bounds are the pipeline a GPU server runs.
GPU_BATCHING = ["--batch-max-items", "256", "--batch-max-tokens", "65536"]


def free_run(args: argparse.Namespace, out: Results) -> None:
    backbone = args.backbone
    texts = workloads(backbone / "tokenizer.json", args.quick)["short"]
    seconds = 3.0 if args.quick else args.seconds
    out.put("machine", machine().describe())
    out.put("source", source_version())
    systems: list[tuple[str, dict[str, str], int]] = [
        (f"this commit, {w} worker{'s' if w > 1 else ''}", {}, w) for w in args.workers
    ]
    if args.buckets_too:  # what shape buckets cost where they are off by default
        systems.append(("this commit, shape buckets on", {}, args.workers[0]))
    if args.cpu_policy_too:  # the most workers, every thread under SCHED_BATCH (server/scheduling.py)
        last = args.workers[-1]
        systems.append((f"this commit, {last} worker{'s' if last > 1 else ''}, cpu policy batch", {}, last))
    old_backbone = backbone
    use_h2load = h2load.installed()
    if not use_h2load:
        print(f"h2load is not installed ({h2load.INSTALL}): single-text Classify from the Python load only")
    with contextlib.ExitStack() as stack:
        if args.baseline:
            path = stack.enter_context(baseline_tree(args.baseline))
            env = {"PYTHONPATH": os.pathsep.join([str(path), str(REPO)])}
            systems.insert(0, (f"baseline {args.baseline}", env, 1))
            old_backbone = compatible_backbone(backbone, path / "headswap", path.parent / "backbone")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in systems}
        for r in range(args.rounds):
            order = systems if r % 2 == 0 else systems[::-1]  # ABBA: drift on the machine hits both alike
            for name, env, workers in order:
                # A baseline from before --workers knows no such flag; one worker is the default on a CPU.
                flags = ["--precision", "fp32"] + (["--workers", str(workers)] if workers > 1 else [])
                flags += GPU_BATCHING if args.gpu_batching else []
                metrics_port = free_port()
                flags += ["--metrics-port", str(metrics_port)]  # h2load's calls are counted from /metrics
                if "buckets on" in name:
                    flags += ["--shape-buckets", "on"]
                if "cpu policy batch" in name:
                    flags += ["--cpu-policy", "batch"]
                with tempfile.TemporaryDirectory(prefix="headswap-free-") as tmp:
                    served = old_backbone if env else backbone
                    with server(
                        served,
                        flags,
                        module="bench._free_serve" if args.fake_encoder else "headswap.client.cli",
                        env=env,
                        log_path=Path(tmp) / "log",
                    ) as proc:
                        wait_all_workers(proc, workers)
                        train_tenant(proc.target, "bench", 200)
                        pid = proc.proc.pid
                        classify = classify_saturation(proc.target, texts, seconds, CONNECTIONS)
                        figures = {
                            "embed_r256": with_cpu(
                                pid,
                                partial(
                                    run_load, _embed_spec(proc.target, texts, 256, seconds), args.clients
                                ),
                            ),
                            "embed_r32": with_cpu(
                                pid,
                                partial(run_load, _embed_spec(proc.target, texts, 32, seconds), args.clients),
                            ),
                            "classify_1": with_cpu(pid, partial(run_load, classify, args.clients)),
                        }
                        if use_h2load:
                            figures["classify_1_h2load"] = classify_h2load(
                                proc.target, pid, metrics_port, texts, seconds
                            )
                        for rate in args.free_rates:  # latency at a fixed rate (open loop), p50 and p99
                            at = LoadSpec(
                                **{
                                    **asdict(classify),
                                    "mode": "classify_rate",
                                    "rate": rate,
                                    "concurrency": 512,
                                }
                            )
                            figures[f"classify_at_{rate:g}"] = load_summary(run_load(at, args.clients))
                rounds[name].append(figures)
                out.put(f"free_{name}_round_{r}", figures)
        summary = {name: _median_rounds(runs) for name, runs in rounds.items()}
        out.put("free_summary", summary)


def classify_h2load(
    target: str, pid: int, metrics_port: int, texts: list[str], seconds: float
) -> dict[str, Any]:
    """Single-text Classify to the tenant "bench" at saturation from h2load (bench/h2load.py): 8 connections
    of 8 calls in flight, as the Python load's 64 callers over 8 connections. Every call carries one text,
    of the workload's median length (h2load sends one body)."""
    text = sorted(texts, key=len)[len(texts) // 2]
    # The request the Python load's raw client sends (bench.load), for this one text.
    message = _request_bytes(LoadSpec(target, "classify_closed", [text], tenant="bench"), 0)
    method = "/headswap.v1.HeadswapService/Classify"
    h2load.warm_up(target, method, message, connections=CONNECTIONS)
    return with_cpu(
        pid,
        partial(
            h2load.run_h2load,
            target,
            f"http://127.0.0.1:{metrics_port}/metrics",
            method,
            message,
            seconds,
            connections=CONNECTIONS,
        ),
    )


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and every process below it (a server's workers):
    those alive, and those that have ended and been waited for, whose time the kernel adds to their parent's
    (cutime, cstime). Without the latter a child's time vanished at its end (a test caught it in the window)."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def with_cpu(pid: int, load: Callable[[], LoadResult]) -> dict[str, Any]:
    """A load's summary with the server's CPU seconds during it, and what it answered per CPU-second: on a
    machine whose cores the load processes share with the server, that (not the rate alone) is the server's
    own cost, whatever share of the cores the load generator took."""
    before = tree_cpu_seconds(pid)
    result = load()
    cpu = tree_cpu_seconds(pid) - before
    out = load_summary(result)
    out["server_cpu_s"] = round(cpu, 2)
    out["inputs_per_cpu_s"] = round(result.inputs / cpu) if cpu > 0 else None
    out["calls_per_cpu_s"] = round(result.calls / cpu) if cpu > 0 else None
    return out


def _embed_spec(target: str, texts: list[str], size: int, seconds: float) -> LoadSpec:
    return LoadSpec(
        target,
        "embed",
        texts,
        request_size=size,
        concurrency=8,
        seconds=seconds,
        client="raw",
        connections=CONNECTIONS,
    )


def _median_rounds(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {
        "embed_r256": "inputs_per_s",
        "embed_r32": "inputs_per_s",
        "classify_1": "calls_per_s",
        "classify_1_h2load": "calls_per_s",
    }
    keys = {k: field for k, field in keys.items() if all(k in run for run in runs)}
    out = {k: float(np.median([run[k][field] for run in runs])) for k, field in keys.items()}
    for k in sorted({k for run in runs for k in run if k.startswith("classify_at_")}):
        for q in ("p50", "p99"):
            out[f"{k}_{q}"] = float(np.median([run[k][f"{q}_ms"] for run in runs]))
    for k, field in keys.items():  # the same per CPU-second of the server, where measured
        per_cpu = [run[k].get(field.replace("_per_s", "_per_cpu_s")) for run in runs]
        if per_cpu and all(v is not None for v in per_cpu):
            out[f"{k}_per_cpu"] = float(np.median(per_cpu))
    return out
