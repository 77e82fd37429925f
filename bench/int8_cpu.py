"""The int8 backbone on CPU: Embed throughput against sentence-transformers and plain ONNX Runtime, and the
serving knobs found with it (ONNX Runtime's spinning, the batcher's padding cap).

    python -m bench.int8_cpu [--seconds 10] [--write-docs] [--no-wait]

The machinery is `bench.embed_throughput`'s (same workloads, same peers, same closed-loop client, same /proc
accounting); this adds the int8 systems and writes its own section of docs/BENCHMARKS.md:

- peers: sentence-transformers (fp32, what a user would otherwise pick), plain ONNX Runtime on the same
  `model_int8.onnx` (and on `model.onnx`, for the int8/fp32 ratio); batches of 16 and 64, each at its best;
- headswap `--precision int8` with spinning off (the default) and on, with the padding cap off (`--batch-max-padding 1`),
  and `--precision fp32`, all over gRPC with 32 concurrent callers (high load) as in `bench.embed_throughput`;
- low load: one caller, one short text per call, closed loop: calls/s, latency, server CPU per text.

Targets (2-core CPU, measured side by side in one run): headswap int8 >= 2.0 x sentence-transformers on
short texts and >= 1.5 x on long texts.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._embed_workload import (
    Measurement,
    OrtPeer,
    StPeer,
    Workload,
    build_workloads,
    calibrate,
    measure_headswap,
    measure_peer,
)
from bench.common import (
    DEFAULT_BACKBONE,
    SATURATION_FLAGS,
    LatencySummary,
    machine,
    markdown_table,
    publish,
    ratio,
    sh_block,
    wait_for_quiet,
)
from bench.data import data_root
from bench.serving import local_server, machine_cpu_seconds, process_cpu_seconds, source_version

HEADING = "## int8 backbone: speed on CPU"
BATCHES = (16, 64)
TARGET_ST = {"short": 2.0, "long": 1.5}
CONFIGS = (
    "--precision int8",
    "--precision int8 --intra-op-spin true",
    "--precision int8 --batch-max-padding 1",
    "--precision fp32",
)
ST, ORT8, ORT32, ORT8_SORTED = (
    "sentence-transformers fp32",
    "ONNX Runtime int8",
    "ONNX Runtime fp32",
    ("ONNX Runtime int8, length-sorted"),
)


@dataclass(frozen=True)
class LowLoad:
    config: str
    calls: int
    seconds: float
    latency: LatencySummary
    server_cpu_ms: float  # per text
    others_share: float  # other processes' CPU, share of one core

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def measure_low_load(target: str, pid: int, texts: Sequence[str], config: str, seconds: float) -> LowLoad:
    """One caller, one text per call, the next as soon as the reply is in."""
    from headswap.client import Client

    walls: list[float] = []
    with Client(target) as client:
        for t in texts[:50]:
            client.embed([t])
        cpu0, (busy0, _), t0 = process_cpu_seconds(pid), machine_cpu_seconds(), time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            client.embed([texts[i % len(texts)]])
            walls.append(1000 * (time.perf_counter() - s))
            i += 1
        elapsed = time.perf_counter() - t0
        server_cpu = process_cpu_seconds(pid) - cpu0
        busy = machine_cpu_seconds()[0] - busy0
    others = max(0.0, busy - server_cpu - 0.0) / elapsed  # includes this client's CPU: an upper bound
    return LowLoad(
        config, len(walls), elapsed, LatencySummary.of(walls), 1000 * server_cpu / len(walls), others
    )


def best(ms: Sequence[Measurement], workload: str, system: str, config: str = "") -> float:
    rates = [m.rate for m in ms if m.workload == workload and m.system == system and m.config == config]
    return max(rates) if rates else float("nan")


def render(
    ms: list[Measurement], low: list[LowLoad], workloads: list[Workload], load: float, command: str
) -> str:
    rows, findings = [], []
    for w in workloads:
        st, o8, o32 = best(ms, w.name, ST), best(ms, w.name, ORT8), best(ms, w.name, ORT32)
        for config in CONFIGS:
            hs = best(ms, w.name, "headswap", config)
            met = "met" if ratio(hs, st) >= TARGET_ST[w.name] else "missed"
            peer = o8 if "int8" in config else o32
            rows.append([w.name, f"`{config}`", f"{hs:,.0f}", f"{st:,.0f}", f"{peer:,.0f}",
                         f"{ratio(hs, st):.2f}" + (f" ({met})" if config == CONFIGS[0] else ""),
                         f"{ratio(hs, peer):.2f}"])  # fmt: skip
        findings.append(
            f"- {w.name}: plain ONNX Runtime int8 / fp32 = {ratio(o8, o32):.2f}; headswap int8 / headswap fp32 = "
            f"{ratio(best(ms, w.name, 'headswap', CONFIGS[0]), best(ms, w.name, 'headswap', CONFIGS[3])):.2f}; "
            f"spinning on / off at high load = "
            f"{ratio(best(ms, w.name, 'headswap', CONFIGS[1]), best(ms, w.name, 'headswap', CONFIGS[0])):.2f}; "
            f"padding cap off / on = "
            f"{ratio(best(ms, w.name, 'headswap', CONFIGS[2]), best(ms, w.name, 'headswap', CONFIGS[0])):.2f}."
        )
    every = [[m.workload, m.system, m.setting, f"`{m.config}`" if m.config else "", f"{m.texts:,}",
              f"{m.seconds:.1f}", f"{m.rate:,.0f}" + (" (disturbed)" if m.disturbed else ""),
              f"{1000 * m.cpu_s / m.texts:.2f}", f"{100 * m.others_cpu_s / m.seconds:.0f}%"] for m in ms]  # fmt: skip
    lows = [[f"`{x.config}`", f"{x.rate:.0f}", f"{x.latency.p50_ms:.1f}", f"{x.latency.p99_ms:.1f}",
             f"{x.server_cpu_ms:.2f}", f"{100 * x.others_share:.0f}%"] for x in low]  # fmt: skip
    m = machine()
    return "\n".join(
        [
            "Texts embedded per second, all systems on the same texts and the same 2 CPU cores, one after the "
            "other in one run: headswap `Embed` over gRPC (32 concurrent callers, the better of requests of "
            "1–16 and of 64 texts), sentence-transformers `encode` (fp32) and plain ONNX Runtime (`InferenceSession` "
            "on the same model file, default options), each peer at its best batch size of "
            f"{' and '.join(map(str, BATCHES))}. Targets for `--precision int8`: ≥ {TARGET_ST['short']} × "
            f"sentence-transformers on short texts, ≥ {TARGET_ST['long']} × on long ones.",
            "",
            markdown_table(
                ["workload", "server flags", "headswap texts/s", "sentence-transformers", "ONNX Runtime (same precision)",
                 "headswap / ST", "headswap / ORT"],
                rows, [False, False, True, True, True, True, True],
            ),
            "",
            *findings,
            "",
            "Low load (one caller, one short text per call, closed loop): not spinning (the default) against spinning.",
            "",
            markdown_table(["server flags", "calls/s", "p50 ms", "p99 ms", "server CPU ms/text", "others"],
                           lows, [False, True, True, True, True, True]),
            "",
            "Every figure:",
            "",
            markdown_table(["workload", "system", "setting", "server flags", "texts", "seconds", "texts/s",
                            "CPU ms/text", "others"], every, [False] * 4 + [True] * 5),
            "",
            "Workloads: " + "; ".join(
                f"{w.name}: {len(w.texts):,} texts, {w.description}, tokens mean {w.tokens_mean:.1f}" for w in workloads
            ) + ".",
            "",
            "Reproduce (starts and stops its own servers; waits for a quiet machine first):",
            "",
            *sh_block(command),
            "",
            f"Machine: {m.describe()}; 1-minute load average {load:.2f} at the start; {source_version()}. "
            "*CPU ms/text*: CPU of everything involved (peer process, or headswap server + client); *others*: "
            "CPU other processes used meanwhile, as a share of one core.",
        ]
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="least seconds per figure")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--no-wait", action="store_true")
    args = parser.parse_args(argv)
    load = wait_for_quiet(max_wait_s=0 if args.no_wait else 600)
    root = data_root()
    fp32_peer = OrtPeer(args.backbone)
    probe = build_workloads(root, args.backbone / "tokenizer.json", 512, 512)
    counts = {w.name: calibrate(fp32_peer, w.texts, args.seconds * 0.6) for w in probe}
    workloads = build_workloads(root, args.backbone / "tokenizer.json", counts["short"], counts["long"])
    ms: list[Measurement] = []
    references = {w.name: fp32_peer.embed(w.texts[:1024], 64) for w in workloads}
    for w in workloads:
        ms += measure_peer(w, ORT32, fp32_peer.embed, args.seconds, BATCHES)
    del fp32_peer
    int8_peer = OrtPeer(args.backbone, model="model_int8")
    for w in workloads:
        ms += measure_peer(w, ORT8, int8_peer.embed, args.seconds, BATCHES)
        if w.name == "short":
            ms += measure_peer(w, ORT8_SORTED, int8_peer.embed_sorted, args.seconds, (16,))
    del int8_peer
    st_peer = StPeer()
    for w in workloads:
        ms += measure_peer(w, ST, st_peer.embed, args.seconds, BATCHES)
    del st_peer
    gc.collect()
    low: list[LowLoad] = []
    with tempfile.TemporaryDirectory(prefix="headswap-int8-bench-") as tmp:
        for i, config in enumerate(CONFIGS):
            with local_server(
                args.backbone,
                Path(tmp) / f"store{i}",
                [*shlex.split(config), *SATURATION_FLAGS],
                log_path=Path(tmp) / f"s{i}.log",
            ) as server:
                fp32 = "fp32" in config
                for w in workloads:
                    ms += measure_headswap(
                        w, server, config, args.seconds, references[w.name] if fp32 else None
                    )
                if "padding" not in config:
                    short = next(w for w in workloads if w.name == "short")
                    low.append(measure_low_load(server.target, server.pid, short.texts, config, args.seconds))
                    print(f"  low load [{config}]: {low[-1]}", flush=True)
    command = "python -m bench.int8_cpu" + (f" --seconds {args.seconds:g}" if args.seconds != 10 else "")
    body = render(ms, low, workloads, load, command + (" --write-docs" if args.write_docs else ""))
    print(body)
    return publish(HEADING, body, args.write_docs)


if __name__ == "__main__":
    sys.exit(main())
