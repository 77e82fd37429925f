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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# py-spy from the kit's wheel, when pip left its script out (a /tmp/site/bin made by an earlier install)
if ! command -v py-spy >/dev/null && ls /tmp/kit/wheels/py_spy-*.whl >/dev/null 2>&1; then
  python3 -m zipfile -e /tmp/kit/wheels/py_spy-*.whl /tmp/py-spy-wheel && mkdir -p /tmp/site/bin &&
    cp /tmp/py-spy-wheel/py_spy-*.data/scripts/py-spy /tmp/site/bin/ && chmod +x /tmp/site/bin/py-spy
fi
# Wheels the shared kit leaves out (flash-tokenizer, the server's tokenizer for plain texts: without it the
# Rust tokenizer does every text, correct but slower; uvloop, the server's event loop: without it asyncio's). Made here by `bash bench/gpu_extra_wheels.sh` into the
# git-ignored .gpu/extra, which the device call carries.
if ls .gpu/extra/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/extra/*.whl
fi
python3 -c "import flash_tokenizer._core" 2>/dev/null && echo "flash-tokenizer: installed" ||
  echo "flash-tokenizer: absent (every text through the Rust tokenizer)"
python3 -c "import uvloop" 2>/dev/null && echo "uvloop: installed" || echo "uvloop: absent (asyncio's loop)"
if [ -z "${SKIP_PYTEST:-}" ]; then
  timeout 240 python3 -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tail -40 | tee "$out/pytest-gpu.txt"
fi
python3 -m bench.gpu --backbone /tmp/kit/backbone --st-model /tmp/st/model --profile --out "$out/gpu.json" \
  --accelerator "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)" "$@" 2>&1 \
  | tee "$out/bench.log" | grep -v "^server_log_tail"
