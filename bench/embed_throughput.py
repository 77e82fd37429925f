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
import gc
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench._embed_report import ORT, ORT_SORTED, ST, Report, render
from bench._embed_workload import (
    SORTED_BATCHES,
    Measurement,
    OrtPeer,
    StPeer,
    build_workloads,
    calibrate,
    measure_headswap,
    measure_peer,
)
from bench.common import DEFAULT_BACKBONE, DOCS, SATURATION_FLAGS, machine, publish, wait_for_quiet
from bench.data import data_root
from bench.serving import batch_limits_from_log, local_server, source_version

HEADING = "## Embed throughput"


# -- main --------------------------------------------------------------------------------------------------


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
    counts = {w.name: calibrate(ort_peer, w.texts, min_seconds * 1.2) for w in probe}
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
    return publish(HEADING, body, args.write_docs, announce=True)


if __name__ == "__main__":
    sys.exit(main())
