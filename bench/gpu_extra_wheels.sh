#!/usr/bin/env bash
# The Python 3.12 x86-64 wheels a lent GPU machine needs beyond ../shared/gpu/kit.sh's: flash-tokenizer (at
# the version pyproject.toml pins; its one dependency besides numpy, requests, is on the machine with
# transformers) and uvloop (the server's event loop; without it the server runs on asyncio's). Into the
# git-ignored .gpu/extra, for bench/gpu_device.sh; carry ".gpu/extra" in the call.
set -euo pipefail
cd "$(dirname "$0")/.."
pin=$(grep -o 'flash-tokenizer==[0-9.]*' pyproject.toml)
uvloop=$(grep -o 'uvloop>=[0-9.]*' pyproject.toml)
rm -rf .gpu/extra && mkdir -p .gpu/extra
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpu/extra "$pin" "$uvloop"
ls -l .gpu/extra
