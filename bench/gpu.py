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
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import _gpu_serving
from bench._gpu_free import free_run
from bench._gpu_report import report_free, report_gpu
from bench._gpu_serving import gpu_run
from bench._gpu_workload import Results
from bench.common import DEFAULT_BACKBONE, DOCS, write_section

HEADING = "## GPU serving"
HEADING_FREE = "## The pipeline's ceiling (free encoder, CPU)"
HEADING_CPU = "## CPU serving beside the code before the GPU work (real encoder)"


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
    parser.add_argument(
        "--cpu-policy-too",
        action="store_true",
        help="--cpu/--fake-encoder: also this commit's most workers with --cpu-policy batch",
    )
    parser.add_argument(
        "--free-rates",
        default="",
        help="--cpu/--fake-encoder: single-text Classify rates (calls/s) to measure p50/p99 at, open loop",
    )
    parser.add_argument(
        "--gpu-batching",
        action="store_true",
        help="--cpu/--fake-encoder: every server batches as on a GPU (256 inputs, 65,536 tokens a pass)",
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
    args.free_rates = [float(r) for r in str(args.free_rates).split(",") if r]
    for name in ("embed_workers", "classify_workers", "profile_workers"):
        setattr(args, name, [int(w) for w in str(getattr(args, name)).split(",") if w])
    _gpu_serving.PROFILE = args.profile
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
        mode += " --gpu-batching" if args.gpu_batching else ""
        intro = f"Measured with `python -m bench.gpu{mode}` on {out.data.get('machine')} ({out.data.get('source')})."
        write_section(heading, intro + "\n\n" + body, DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
