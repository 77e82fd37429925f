"""The int8 recipes compared: what chose `server/export/quantize.py`'s DEFAULT_RECIPE, re-measured.

    python -m bench.int8_recipes [--backbone DIR] [--data DIR] [--cost] [--write-docs]

Each recipe is ONNX Runtime's `quantize_dynamic` of the exported backbone's fused fp32 model with its own
settings (`Int8Recipe`: operator types, per-channel or per-tensor weights, reduce_range, weight type, nodes
left in fp32). Quality: the cosine of each embedding to fp32's on 1,000 real sentences (500 Banking77 test
questions, 500 SST-2 dev sentences, a seeded sample), run in length-sorted batches of 16 as the server runs
them. With `--cost`: CPU ms per text of one ONNX Runtime thread (spinning off, best of 3 passes) on the
short sentences and on the long texts of `bench.embed_throughput`, CPU time being what other work on a
shared machine disturbs least.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench._embed_workload import LONG_TOKENS
from bench.common import bench_parser, machine, markdown_table, write_section
from bench.data import data_root, load_tokenizer, long_workload, read_banking77, read_sst2
from bench.serving import source_version
from headswap.server.export.quantize import (
    DEFAULT_RECIPE,
    Int8Recipe,
    excluded_nodes,
    quantized_operator_counts,
)
from headswap.server.inference.precision import has_vnni, read_cpu_flags

HEADING = "## int8 backbone: the recipes compared"
BATCH = 16
SEED = 0

PER_TENSOR = Int8Recipe(per_channel=False)
PER_CHANNEL = Int8Recipe()


@dataclass(frozen=True)
class Candidate:
    name: str
    recipe: Int8Recipe | None  # None: quantize_dynamic's own defaults (every op type, embeddings included)
    uint8_weights: bool = False


CANDIDATES = (
    Candidate("naive: `quantize_dynamic` defaults (all op types, embeddings included, per tensor)", None),
    Candidate("MatMul + Attention only (embeddings fp32), per tensor", PER_TENSOR),
    Candidate("... + `reduce_range` (7-bit weights)", replace(PER_TENSOR, reduce_range=True)),
    Candidate("... uint8 weights", PER_TENSOR, uint8_weights=True),
    Candidate("MatMul + Attention, **per channel**", PER_CHANNEL),
    Candidate("... + `reduce_range`", replace(PER_CHANNEL, reduce_range=True)),
    Candidate("... uint8 weights", PER_CHANNEL, uint8_weights=True),
    Candidate(
        "per channel, feed-forward output matrices (6) in fp32",
        replace(PER_CHANNEL, exclude=(r"/layer\.\d+/output/dense/",)),
    ),
    Candidate(
        "per channel, feed-forward input matrices (6) in fp32",
        replace(PER_CHANNEL, exclude=(r"/intermediate/dense/",)),
    ),
    Candidate(
        "per channel, attention output matrices (6) in fp32",
        replace(PER_CHANNEL, exclude=(r"/attention/output/dense/",)),
    ),
    Candidate("per channel, fused Attention (6) in fp32", replace(PER_CHANNEL, op_types=("MatMul",))),
    Candidate("per channel, first and last layer in fp32", replace(PER_CHANNEL, exclude=(r"/layer\.[05]/",))),
    Candidate("**per channel, 7 most sensitive nodes in fp32 (DEFAULT_RECIPE)**", DEFAULT_RECIPE),
)


@dataclass(frozen=True)
class Row:
    name: str
    mean: float
    min: float
    p1: float
    fp32_nodes: int
    short_ms: float | None = None
    long_ms: float | None = None


def sentences(root: Path) -> list[str]:
    rng = random.Random(SEED)
    bank = [text for text, _ in read_banking77(root, "test")]
    sst = read_sst2(root, "dev")
    return rng.sample(bank, 500) + rng.sample(sst, 500)


class Model:
    def __init__(self, backbone: Path, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((backbone / "manifest.json").read_text())
        self.output = manifest["output_name"]
        self.tokenizer = Tokenizer.from_file(str(backbone / manifest["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=int(manifest["max_length"]))
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Length-sorted batches of BATCH, rows back in the order given."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            encodings = self.tokenizer.encode_batch([texts[i] for i in rows])
            feeds = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            for i, vector in zip(rows, self.session.run([self.output], feeds)[0], strict=True):
                out[i] = vector
        return np.stack(out)

    def cpu_ms_per_text(self, texts: Sequence[str], passes: int = 3) -> float:
        best = float("inf")
        for _ in range(passes):
            started = time.thread_time()  # one intra-op thread: the calling thread does the work
            self.embed(texts)
            best = min(best, time.thread_time() - started)
        return 1000.0 * best / len(texts)


def quantize(fp32: Path, out: Path, candidate: Candidate) -> int:
    """Write the candidate's int8 model; returns how many MatMul and Attention nodes it left in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    recipe = candidate.recipe
    excluded = excluded_nodes(fp32, recipe) if recipe is not None else []
    quantize_dynamic(
        str(fp32),
        str(out),
        op_types_to_quantize=list(recipe.op_types) if recipe is not None else None,
        per_channel=recipe.per_channel if recipe is not None else False,
        reduce_range=recipe.reduce_range if recipe is not None else False,
        weight_type=QuantType.QUInt8 if candidate.uint8_weights else QuantType.QInt8,
        nodes_to_exclude=excluded,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    counts = quantized_operator_counts(out)
    return counts.get("MatMul", 0) + counts.get("Attention", 0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray(np.sum(a * b, axis=1))


def measure(backbone: Path, texts: list[str], long: list[str] | None) -> list[Row]:
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every tensor at INFO
    manifest = json.loads((backbone / "manifest.json").read_text())
    fp32 = backbone / manifest["model_fp32"]
    reference = Model(backbone, fp32).embed(texts)
    rows = []
    if long is not None:
        single = Model(backbone, fp32, threads=1)
        short_ms, long_ms = costs(single, texts, long)
        rows.append(Row("fp32 (the reference)", 1.0, 1.0, 1.0, 0, short_ms, long_ms))
    with tempfile.TemporaryDirectory(prefix="headswap-int8-") as tmp:
        for n, candidate in enumerate(CANDIDATES):
            path = Path(tmp) / f"{n}.onnx"
            kept = quantize(fp32, path, candidate)
            c = cosines(Model(backbone, path).embed(texts), reference)
            row = Row(candidate.name, float(c.mean()), float(c.min()), float(np.percentile(c, 1)), kept)
            if long is not None:
                short_ms, long_ms = costs(Model(backbone, path, 1), texts, long)
                row = replace(row, short_ms=short_ms, long_ms=long_ms)
            rows.append(row)
            print(f"{candidate.name}: mean {c.mean():.4f} min {c.min():.4f}", file=sys.stderr, flush=True)
            path.unlink()
    return rows


def costs(model: Model, short: list[str], long: list[str]) -> tuple[float, float]:
    return model.cpu_ms_per_text(short), model.cpu_ms_per_text(long)


def render(rows: list[Row], command: str) -> str:
    """The section's body (the heading is written by `write_section`)."""
    reference = rows[0] if rows and rows[0].short_ms is not None else None
    header = ["recipe", "cosine mean", "min", "1st pct.", "nodes in fp32"]
    if reference is not None:
        header += ["short CPU ms/text", "long CPU ms/text", "fp32 / int8 cost"]
    table = []
    for row in rows:
        cells = [row.name, f"{row.mean:.4f}", f"{row.min:.4f}", f"{row.p1:.4f}", str(row.fp32_nodes)]
        if reference is not None and reference.short_ms and reference.long_ms:
            short, long = row.short_ms or float("nan"), row.long_ms or float("nan")
            speed = f"{reference.short_ms / short:.2f} / {reference.long_ms / long:.2f}"
            cells += [f"{short:.2f}", f"{long:.2f}", speed]
        table.append(cells)
    vnni = "a CPU with VNNI" if has_vnni(read_cpu_flags()) else "a CPU without VNNI"
    return "\n".join(
        [
            f"`{command}` on {machine().describe()}; {vnni}; {source_version()}. Cosine of each int8 embedding "
            "to fp32's on 1,000 real sentences (500 Banking77 test questions, 500 SST-2 dev sentences, seed 0), "
            "in length-sorted batches of 16 as the server runs them; *nodes in fp32*: MatMul or Attention nodes "
            "a recipe leaves unquantised.",
            "",
            markdown_table(header, table, [False] + [True] * (len(header) - 1)),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--cost", action="store_true", help="also CPU ms per text on one thread (slow)")
    args = parser.parse_args(argv)
    root = args.data or data_root()
    texts = sentences(root)
    long = None
    if args.cost:
        tokenizer = load_tokenizer(args.backbone / "tokenizer.json")
        long = long_workload(read_sst2(root), tokenizer, 200, tokens=LONG_TOKENS)
    rows = measure(args.backbone, texts, long)
    body = render(rows, "python -m bench.int8_recipes" + (" --cost" if args.cost else ""))
    print(HEADING + "\n\n" + body)
    if args.write_docs:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
