"""The server on CUDA (`pytest -m gpu`): skipped on a machine without a GPU, never passing there.

Run on a GPU machine with the text backbone's `model_fp16.onnx` (HEADSWAP_GPU_BACKBONE, default: the one the
tests export). What they hold the GPU path to:

- Embed on CUDA (fp16, shape buckets on) agrees with the fp32 model on the CPU: cosine >= 0.999 for every
  text. The reference vectors (`minilm_fp32_reference.npz`, 64 Banking77 test sentences) were made on the
  CPU with `load_backbone(dir, device="cpu", precision="fp32")`, so this runs where only the fp16 model is;
- every shape bucket ran before SERVING (the log says how many, and the count is the grid's);
- a head trained through AdaptHead (on the GPU) answers Classify, on its training labels;
- a swap under load: Classify calls running while the tenant is retrained and rolled back all succeed, and
  none answers with a version older than one the caller has already seen.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.onnx import CUDA, _cuda_device_present
from tests.helpers import DATA, ServerProcess

REFERENCE = Path(__file__).with_name("minilm_fp32_reference.npz")


def cuda_available() -> bool:
    try:
        import onnxruntime as ort

        return CUDA in ort.get_available_providers() and _cuda_device_present()
    except Exception:
        return False


# HEADSWAP_GPU_DRY_RUN=1 runs these on a CPU (fp32, buckets on, provider checks relaxed) to check the tests
# themselves before a GPU machine's time is spent on them; it is never how they pass.
DRY_RUN = os.environ.get("HEADSWAP_GPU_DRY_RUN") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (cuda_available() or DRY_RUN), reason="no CUDA GPU here: the GPU tests run on a GPU machine"
    ),
]


@pytest.fixture(scope="module")
def gpu_backbone(request: pytest.FixtureRequest) -> Path:
    configured = os.environ.get("HEADSWAP_GPU_BACKBONE")
    if configured:
        return Path(configured)
    return Path(request.getfixturevalue("backbone_dir"))


@pytest.fixture(scope="module")
def cuda_server(gpu_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("gpu")
    where = (
        ("--device", "cpu", "--precision", "fp32", "--shape-buckets", "on")
        if DRY_RUN
        else ("--device", "cuda", "--precision", "fp16")
    )
    proc = ServerProcess(
        "--backbone", str(gpu_backbone), *where, "--workers", "1", log_path=work / "server.log"
    )  # fmt: skip
    try:
        proc.wait_serving(600)
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()


def test_embed_on_cuda_matches_the_cpu_fp32_model(cuda_server: ServerProcess) -> None:
    from headswap.client import Client

    reference = np.load(REFERENCE)
    texts = [str(t) for t in reference["texts"]]
    with Client(cuda_server.target) as hs:
        result = hs.embed_full(texts)
        single = np.stack([hs.embed([t])[0] for t in texts[:8]])  # one per call: other buckets
    if not DRY_RUN:
        assert result.backbone.provider == CUDA and result.backbone.precision == "fp16"
    for got in (result.embeddings, single):
        want = reference["vectors"][: len(got)]
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() >= 0.999, cosine.min()


def test_every_bucket_ran_before_serving(cuda_server: ServerProcess) -> None:
    log = cuda_server.log()
    found = re.search(r"(\d+) shape buckets warmed up in ([\d.]+)s", log)
    assert found, log[-2000:]
    rows = 16 if DRY_RUN else 256  # the CPU's batches hold 16 inputs, CUDA's 256
    assert int(found.group(1)) == len(ShapeBuckets.for_backbone(rows, 256).shapes())
    assert log.index(found.group(0)) < log.index("SERVING on port")


def banking77(per_label: int, labels: int) -> tuple[list[str], list[str]]:
    import csv

    by_label: dict[str, list[str]] = {}
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_label.setdefault(row["category"], []).append(row["text"])
    chosen = sorted(by_label)[:labels]
    texts = [t for label in chosen for t in by_label[label][:per_label]]
    return texts, [label for label in chosen for _ in by_label[label][:per_label]]


def test_a_head_trained_on_the_gpu_answers(cuda_server: ServerProcess) -> None:
    from headswap.client import Client

    texts, labels = banking77(20, 5)
    with Client(cuda_server.target, timeout=300) as hs:
        result = hs.adapt_head("gpu-head", texts, labels)
        assert result.activated and result.metrics.accuracy > 0.8
        predictions = hs.classify("gpu-head", texts)
    right = sum(p.label == label for p, label in zip(predictions, labels, strict=True))
    assert right / len(texts) > 0.9


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition the callers' tasks make true."""
    while not condition():  # noqa: ASYNC110 - the callers append to a list; no event to wait on
        await asyncio.sleep(0.01)


def test_swap_under_load_fails_no_call(cuda_server: ServerProcess) -> None:
    # asyncio.run rather than an async test: the GPU machine has pytest but not pytest-asyncio.
    asyncio.run(swap_under_load(cuda_server))


async def swap_under_load(cuda_server: ServerProcess) -> None:
    from headswap.client import AsyncClient

    texts, labels = banking77(10, 4)
    async with AsyncClient(cuda_server.target, timeout=300) as hs:
        first = await hs.adapt_head("gpu-swap", texts, labels, validation_fraction=0)
        stop = asyncio.Event()
        seen: list[int] = []
        errors: list[BaseException] = []

        async def caller() -> None:
            newest = 0
            while not stop.is_set():
                try:
                    (prediction,) = await hs.classify("gpu-swap", [texts[len(seen) % len(texts)]])
                except Exception as exc:  # any failure is what this test looks for
                    errors.append(exc)
                    return
                seen.append(prediction.version)
                assert prediction.version >= newest or rolled_back.is_set()
                newest = max(newest, prediction.version)

        rolled_back = asyncio.Event()
        callers = [asyncio.create_task(caller()) for _ in range(16)]
        second = await hs.adapt_head("gpu-swap", texts, labels, validation_fraction=0, force_activate=True)
        await until(lambda: second.version in seen)
        rolled_back.set()
        await hs.activate_head_version("gpu-swap", first.version)
        count = len(seen)
        await until(lambda: len(seen) >= count + 50)
        stop.set()
        await asyncio.gather(*callers)
    assert not errors, errors[:3]
    assert {first.version, second.version} <= set(seen)
    assert seen[-1] == first.version
