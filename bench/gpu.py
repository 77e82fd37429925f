"""GPU serving, side by side in one run: headswap over gRPC against the same ONNX Runtime session alone.

    python -m bench.gpu --backbone DIR [--st-model DIR] [--quick] [--write-docs] [--out FILE]
    python -m bench.gpu --fake-encoder [--baseline REV] [--rounds N] [--write-docs]
    python -m bench.gpu --cpu [--baseline REV] [--rounds N] [--write-docs]

On a GPU machine (the text backbone's `model_fp16.onnx`, ONNX Runtime's CUDA provider), same texts for every
system: "short" (Banking77 + SST-2 sentences of 4-40 words) and "long" (SST-2 sentences joined and cut at 126
tokens). It measures, in this order:

1. plain ONNX Runtime, fp16 on CUDA, tokenize + forward in one thread, batches of 1024 (the peer a user
   would write); the forward pass alone at one fixed shape (batch 1024 at 32 and 128 tokens: the ceiling);
   sentence-transformers fp16, batches of 256, when `--st-model` names its model directory;
2. headswap Embed over gRPC (`headswap serve --workers W`, buckets on), driven by `--clients` load processes
   (`bench/load.py`, raw requests of 256 texts, and of 32), for each W in `--workers`;
3. single-text Classify: latency at fixed rates (open loop, from when each call was due) and calls/s at
   saturation (closed loop);
4. AdaptHead on 10,000 examples once their embeddings are cached (defaults, and validation_fraction=0), and
   the head's fit alone (`train_head`) on the GPU and on the CPU.

Every figure is written to `--out` (JSON) as soon as it is measured, so a run cut short keeps what it did.

`--fake-encoder` runs on a CPU: the server with its forward pass taken out (`bench/_free_serve.py`: the real
tokenizer, a free encoder), so what is measured is the pipeline itself (gRPC, protobuf, tokenizing,
batching, heads, replies): its ceiling whatever the accelerator. With `--baseline REV` the same runs are made,
alternating, against the server of commit REV (checked out into a temporary worktree), so the ratio is
measured side by side on one machine in one run. `--cpu` makes the same runs with the real encoder (fp32 on the
CPU, shape buckets off as by default there): what the GPU work changed for a CPU deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DEFAULT_BACKBONE,
    DOCS,
    REPO,
    SATURATION_FLAGS,
    LatencySummary,
    data_root,
    load_tokenizer,
    long_workload,
    machine,
    markdown_table,
    read_banking77,
    read_sst2,
    short_workload,
    source_version,
    write_section,
)
from bench.load import LoadResult, LoadSpec, run_load

HEADING = "## GPU serving"
HEADING_FREE = "## The pipeline's ceiling (free encoder, CPU)"
HEADING_CPU = "## CPU serving beside the code before the GPU work (real encoder)"
LONG_TOKENS = 126


class Results:
    """Figures as they come, kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def workloads(tokenizer_path: Path, quick: bool) -> dict[str, list[str]]:
    root = data_root()
    candidates = [t for t, _ in read_banking77(root)] + read_sst2(root)
    tok = load_tokenizer(tokenizer_path)
    return {
        "short": short_workload(candidates, 2048 if quick else 16384),
        "long": long_workload(read_sst2(root), tok, 256 if quick else 4096, tokens=LONG_TOKENS),
    }


# -- peers: the same ONNX Runtime session alone, sentence-transformers ----------------------------------------


def ort_session(model: Path) -> Any:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(model), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


def run_bound(session: Any, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """As the server runs it: inputs bound from host memory, the output written on the device, one copy."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    binding.bind_output(output, "cuda" if on_cuda else "cpu")
    session.run_with_iobinding(binding)
    return np.asarray(binding.copy_outputs_to_cpu()[0])


def text_feeds(session: Any, encodings: Sequence[Any], length: int | None = None) -> dict[str, np.ndarray]:
    longest = length or max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: feeds[i.name] for i in session.get_inputs()}


def timed(run: Callable[[], int], seconds: float) -> float:
    """Items per second over whole runs of `run` lasting at least `seconds`."""
    run()  # warm: every shape it uses has run once
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += run()
    return done / (time.perf_counter() - t0)


def ort_peer(backbone: Path, texts: dict[str, list[str]], out: Results, seconds: float) -> None:
    session = ort_session(backbone / "model_fp16.onnx")
    output = session.get_outputs()[0].name
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(backbone / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.no_padding()
    for name, workload in texts.items():

        def one_pass(workload: list[str] = workload) -> int:
            for start in range(0, len(workload), 1024):
                batch = tok.encode_batch(workload[start : start + 1024])
                run_bound(session, text_feeds(session, batch), output)
            return len(workload)

        # Every batch of a pass is a shape of its own: one pass first, so that none pays its first run here.
        one_pass()
        out.put(f"ort_fp16_tokenize_forward_b1024_{name}", round(timed(one_pass, seconds)))
    for tokens in (32, 128):
        encodings = tok.encode_batch(["word " * (tokens - 2)] * 1024)
        feeds = text_feeds(session, encodings, tokens)

        def forward(feeds: dict[str, np.ndarray] = feeds) -> int:
            return len(run_bound(session, feeds, output))

        out.put(f"forward_only_fixed_b1024_t{tokens}", round(timed(forward, seconds)))


def st_peer(model_dir: Path, texts: dict[str, list[str]], out: Results, seconds: float) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cuda")
    model.half()
    for name, workload in texts.items():
        model.encode(workload[:1024], batch_size=256)

        def one_pass(workload: list[str] = workload) -> int:
            model.encode(workload, batch_size=256, convert_to_numpy=True)
            torch.cuda.synchronize()
            return len(workload)

        out.put(f"sentence_transformers_fp16_b256_{name}", round(timed(one_pass, seconds)))


# -- headswap --------------------------------------------------------------------------------------------


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


# -- the free encoder, on a CPU, beside a baseline commit ---------------------------------------------------


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
    old_backbone = backbone
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
                if "buckets on" in name:
                    flags += ["--shape-buckets", "on"]
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
                        classify = classify_saturation(proc.target, texts, seconds)
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
                rounds[name].append(figures)
                out.put(f"free_{name}_round_{r}", figures)
        summary = {name: _median_rounds(runs) for name, runs in rounds.items()}
        out.put("free_summary", summary)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and every process below it (a server's workers)."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
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


def _embed_spec(target: str, texts: list[str], size: int, seconds: float) -> LoadSpec:
    return LoadSpec(target, "embed", texts, request_size=size, concurrency=8, seconds=seconds, client="raw")


def _median_rounds(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {
        "embed_r256": "inputs_per_s",
        "embed_r32": "inputs_per_s",
        "classify_1": "calls_per_s",
    }
    out = {k: float(np.median([run[k][field] for run in runs])) for k, field in keys.items()}
    for k, field in keys.items():  # the same per CPU-second of the server, where measured
        per_cpu = [run[k].get(field.replace("_per_s", "_per_cpu_s")) for run in runs]
        if per_cpu and all(v is not None for v in per_cpu):
            out[f"{k}_per_cpu"] = float(np.median(per_cpu))
    return out


# -- the report ------------------------------------------------------------------------------------------


def report_gpu(data: dict[str, Any]) -> str:
    rows = []

    def add(system: str, short: Any, long: Any = "—") -> None:
        rows.append([system, _num(short), _num(long)])

    add(
        "plain ONNX Runtime CUDA fp16, tokenize + forward in one thread, batch 1024",
        data.get("ort_fp16_tokenize_forward_b1024_short"),
        data.get("ort_fp16_tokenize_forward_b1024_long"),
    )
    add(
        "sentence-transformers fp16, batch 256",
        data.get("sentence_transformers_fp16_b256_short", "not run"),
        data.get("sentence_transformers_fp16_b256_long", "not run"),
    )
    add(
        "forward pass alone, fixed shape, batch 1024 (the ceiling)",
        f"{_num(data.get('forward_only_fixed_b1024_t32'))} at 32 tokens",
        f"{_num(data.get('forward_only_fixed_b1024_t128'))} at 128 tokens",
    )
    for key, value in sorted(data.items()):
        if key.startswith("headswap_embed_workers_"):
            workers = key.rsplit("_", 1)[1]
            add(
                f"headswap Embed over gRPC, {workers} worker(s), requests of 256",
                value["short_r256"]["inputs_per_s"],
                value.get("long_r256", {}).get("inputs_per_s", "—"),
            )
            add(
                f"headswap Embed over gRPC, {workers} worker(s), requests of 32",
                value["short_r32"]["inputs_per_s"],
            )
    table = markdown_table(["system", "short texts/s", "long texts/s"], rows, [False, True, True])
    parts = [table]
    for key, value in sorted(data.items()):
        if key.startswith("headswap_classify_workers_"):
            workers = key.rsplit("_", 1)[1]
            lines = [
                [name.replace("rate_", "") + (" calls/s offered" if name.startswith("rate") else " (closed loop)"),
                 _num(v["calls_per_s"]), _num(v["p50_ms"]), _num(v["p99_ms"]), json.dumps(v["errors"])]
                for name, v in value.items()
            ]  # fmt: skip
            parts.append(
                f"Single-text Classify, {workers} worker(s):\n\n"
                + markdown_table(
                    ["load", "calls/s answered", "p50 ms", "p99 ms", "errors"],
                    lines,
                    [False, True, True, True, False],
                )
            )
    if "adapt_head_10k" in data:
        parts.append("AdaptHead on 10,000 Banking77 examples: " + json.dumps(data["adapt_head_10k"]))
    if "train_head_10k_alone" in data:
        parts.append(
            "The head's fit alone (`train_head`, 10,000 × 384): " + json.dumps(data["train_head_10k_alone"])
        )
    return "\n\n".join(parts)


def report_free(data: dict[str, Any]) -> str:
    summary = data.get("free_summary", {})
    names = list(summary)
    rows = []
    for key, label in (
        ("embed_r256", "Embed, requests of 256 short texts: texts/s"),
        ("embed_r32", "Embed, requests of 32 short texts: texts/s"),
        ("classify_1", "Classify, one text per call: calls/s"),
        ("embed_r256_per_cpu", "Embed, requests of 256: texts per server CPU-second"),
        ("embed_r32_per_cpu", "Embed, requests of 32: texts per server CPU-second"),
        ("classify_1_per_cpu", "Classify, one text per call: calls per server CPU-second"),
    ):
        if not all(key in summary[name] for name in names):
            continue
        values = [summary[name][key] for name in names]
        ratios = [f"{v / values[0]:.2f}×" if values[0] else "—" for v in values[1:]]
        rows.append([label, *[_num(v) for v in values], *ratios])
    ratio_heads = [f"{name} / {names[0]}" for name in names[1:]]
    return markdown_table(
        ["measure", *names, *ratio_heads],
        rows,
        [False, *[True] * len(names), *[True] * len(ratio_heads)],
    )


def _num(value: Any) -> str:
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value) if value is not None else "—"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--st-model", type=Path, default=None, help="sentence-transformers model directory")
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    parser.add_argument("--fake-encoder", action="store_true", help="CPU: the pipeline with a free encoder")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU: the same runs as --fake-encoder with the real encoder (fp32)"
    )
    parser.add_argument("--baseline", default="", help="with --fake-encoder: a commit to measure beside")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--workers", default="", help="worker counts to measure, comma-separated (default 1,4,8; free: 1,2)"
    )
    parser.add_argument("--clients", type=int, default=8, help="load processes")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per figure")
    parser.add_argument("--rates", default="500,2000", help="Classify rates (calls/s) to offer")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--accelerator", default="NVIDIA GPU")
    parser.add_argument("--source", default="", help="what is measured (a commit), when git is not at hand")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--buckets-too",
        action="store_true",
        help="--cpu/--fake-encoder: also this commit with shape buckets on",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy on a worker during the loads")
    parser.add_argument(
        "--embed-workers", default="", help="worker counts to measure Embed at (default: all)"
    )
    parser.add_argument(
        "--classify-workers", default="", help="worker counts to measure Classify at (default: the last)"
    )
    parser.add_argument("--profile-workers", default="", help="worker counts to profile (default: the last)")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())) / "gpu.json"
    )
    args = parser.parse_args(argv)
    default_workers = "1,2" if args.fake_encoder else ("1" if args.cpu else "1,4,8")
    args.workers = [int(w) for w in str(args.workers or default_workers).split(",") if w]
    args.rates = [float(r) for r in str(args.rates).split(",") if r]
    for name in ("embed_workers", "classify_workers", "profile_workers"):
        setattr(args, name, [int(w) for w in str(getattr(args, name)).split(",") if w])
    global PROFILE
    PROFILE = args.profile
    out = Results(args.out)
    if args.fake_encoder or args.cpu:
        free_run(args, out)
        body = report_free(out.data)
        heading = HEADING_FREE if args.fake_encoder else HEADING_CPU
    else:
        gpu_run(args, out)
        body = report_gpu(out.data)
        heading = HEADING
    print(body)
    if args.write_docs:
        mode = " --fake-encoder" if args.fake_encoder else (" --cpu" if args.cpu else "")
        intro = f"Measured with `python -m bench.gpu{mode}` on {out.data.get('machine')} ({out.data.get('source')})."
        write_section(heading, intro + "\n\n" + body, DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
