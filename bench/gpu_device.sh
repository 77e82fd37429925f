#!/usr/bin/env bash
# The GPU checks and benchmark, run on a lent GPU machine (see docs/BENCHMARKS.md, "GPU serving"), once
# onnxruntime-gpu (../shared/gpu/split-wheel.sh's parts, in /tmp/ort) and the kit (../shared/gpu/kit.sh, in
# /tmp/kit) are installed there, the data sets are in /tmp/data and, for the sentence-transformers peer,
# its model (fp16) in /tmp/st/model. Writes everything to $OUT: pytest's output, bench.gpu's JSON and log,
# py-spy profiles of one worker. Arguments go to bench.gpu.
set -uo pipefail
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HEADSWAP_DATA=/tmp/data HEADSWAP_GPU_BACKBONE=/tmp/kit/backbone
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 240 python3 -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tail -40 | tee "$out/pytest-gpu.txt"
python3 -m bench.gpu --backbone /tmp/kit/backbone --st-model /tmp/st/model --profile --out "$out/gpu.json" \
  --accelerator "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)" "$@" 2>&1 \
  | tee "$out/bench.log" | grep -v "^server_log_tail"
