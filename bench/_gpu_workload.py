"""`bench.gpu`'s texts, its results file, and the peers: the same ONNX Runtime session alone, and
sentence-transformers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import data_root, load_tokenizer, long_workload, read_banking77, read_sst2, short_workload

LONG_TOKENS = 126


class Results:
    """Figures as they come, kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def workloads(tokenizer_path: Path, quick: bool) -> dict[str, list[str]]:
    root = data_root()
    candidates = [t for t, _ in read_banking77(root)] + read_sst2(root)
    tok = load_tokenizer(tokenizer_path)
    return {
        "short": short_workload(candidates, 2048 if quick else 16384),
        "long": long_workload(read_sst2(root), tok, 256 if quick else 4096, tokens=LONG_TOKENS),
    }


# -- peers: the same ONNX Runtime session alone, sentence-transformers ----------------------------------------


def ort_session(model: Path) -> Any:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(model), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


def run_bound(session: Any, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """As the server runs it: inputs bound from host memory, the output written on the device, one copy."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    binding.bind_output(output, "cuda" if on_cuda else "cpu")
    session.run_with_iobinding(binding)
    return np.asarray(binding.copy_outputs_to_cpu()[0])


def text_feeds(session: Any, encodings: Sequence[Any], length: int | None = None) -> dict[str, np.ndarray]:
    longest = length or max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: feeds[i.name] for i in session.get_inputs()}


def timed(run: Callable[[], int], seconds: float) -> float:
    """Items per second over whole runs of `run` lasting at least `seconds`."""
    run()  # warm: every shape it uses has run once
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += run()
    return done / (time.perf_counter() - t0)


def ort_peer(backbone: Path, texts: dict[str, list[str]], out: Results, seconds: float) -> None:
    session = ort_session(backbone / "model_fp16.onnx")
    output = session.get_outputs()[0].name
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(backbone / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.no_padding()
    for name, workload in texts.items():

        def one_pass(workload: list[str] = workload) -> int:
            for start in range(0, len(workload), 1024):
                batch = tok.encode_batch(workload[start : start + 1024])
                run_bound(session, text_feeds(session, batch), output)
            return len(workload)

        # Every batch of a pass is a shape of its own: one pass first, so that none pays its first run here.
        one_pass()
        out.put(f"ort_fp16_tokenize_forward_b1024_{name}", round(timed(one_pass, seconds)))
    for tokens in (32, 128):
        encodings = tok.encode_batch(["word " * (tokens - 2)] * 1024)
        feeds = text_feeds(session, encodings, tokens)

        def forward(feeds: dict[str, np.ndarray] = feeds) -> int:
            return len(run_bound(session, feeds, output))

        out.put(f"forward_only_fixed_b1024_t{tokens}", round(timed(forward, seconds)))


def st_peer(model_dir: Path, texts: dict[str, list[str]], out: Results, seconds: float) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cuda")
    model.half()
    for name, workload in texts.items():
        model.encode(workload[:1024], batch_size=256)

        def one_pass(workload: list[str] = workload) -> int:
            model.encode(workload, batch_size=256, convert_to_numpy=True)
            torch.cuda.synchronize()
            return len(workload)

        out.put(f"sentence_transformers_fp16_b256_{name}", round(timed(one_pass, seconds)))
