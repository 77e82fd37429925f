"""The int8 backbone for CPUs: ONNX Runtime's dynamic quantisation of the fused fp32 model, and its gate.

The recipe, and why (the measurements are in docs/BENCHMARKS.md, "int8 backbone: the recipe"; the chosen
model is re-measured by `python -m eval.int8_quality` and `python -m bench.int8_cpu`):

- After fusion: quantising the fused graph turns each fused `Attention` into one `QAttention` (int8 QKV
  projection, attention still one kernel; a test checks all 6 are there). Quantising first would turn the
  MatMuls the attention fusion matches on into MatMulInteger nodes, so no fused Attention could form (by
  construction of the optimizer's patterns; not measured).
- Dynamic, not static: activation ranges are taken per batch at run time, and no calibration set is needed
  at export. A static QDQ model cannot quantise the fused `Attention`, and ONNX Runtime 1.31 folds its
  MatMul QDQ pairs into weight-only `MatMulNBits` kernels: measured slower than fp32 on this CPU (0.72 x).
- Per-channel weights: one scale per output column instead of one per matrix, so a column of large weights
  no longer coarsens all the others. It took the mean cosine to fp32 on 1,000 real sentences from 0.963 to
  0.992 (minimum 0.81 to 0.97), at no cost in speed.
- Left in fp32: the embeddings (`EmbedLayerNormalization` and its tables: a lookup, nothing to speed up;
  quantising them gained nothing), the pooling and normalisation (reductions, no int8 kernels), and the
  nodes named by `Int8Recipe.exclude` (see `DEFAULT_RECIPE`).

The gate compares the int8 model with the PyTorch original on real sentences run the way serving runs them
(length-sorted batches) and refuses to write a model whose mean or minimum cosine is below the thresholds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headswap.server.manifest import MIN_COSINE, MIN_MEAN_COSINE_INT8

log = logging.getLogger(__name__)

MIN_COSINE_INT8 = MIN_COSINE["int8"]
PARITY_BATCH = 16  # as the CPU batcher's default: dynamic ranges are taken per batch


@dataclass(frozen=True)
class Int8Recipe:
    op_types: tuple[str, ...] = ("MatMul", "Attention")
    per_channel: bool = True
    # 7-bit weights: ONNX Runtime's advice against u8s8 saturation on AVX2 without VNNI. Measured on such a
    # CPU it changed nothing with per-channel weights (mean cosine 0.9922 -> 0.9915), so it stays off.
    reduce_range: bool = False
    # Regular expressions over node names of the fused graph: these nodes stay fp32.
    exclude: tuple[str, ...] = ()

    def describe(self, excluded: Sequence[str]) -> dict[str, str]:
        return {
            "method": "onnxruntime.quantization.quantize_dynamic after the transformer fusions",
            "weights": "int8, " + ("per channel" if self.per_channel else "per tensor"),
            "activations": "uint8, dynamic per batch",
            "reduce_range": str(self.reduce_range).lower(),
            "op_types": ",".join(self.op_types),
            "excluded": ",".join(excluded) or "none",
            "kept_fp32": "embeddings (EmbedLayerNormalization), pooling, normalisation"
            + (", excluded nodes" if excluded else ""),
        }


# The nodes left in fp32, chosen by measurement (each node quantised alone, error summed per text, then the
# nodes with the most error per unit of compute left out greedily until the worst real sentence passed the
# gate): the feed-forward blocks whose input carries MiniLM's outlier channels (one channel of the hidden state
# reaches 28 where the rest stay under 2, so a per-tensor activation scale leaves the others a few levels).
# With every MatMul and Attention in int8 the cosine to fp32 on 1,000 real sentences was mean 0.992, min 0.970
# (0.966 on "thanks!" in the parity set), at 1.61 x fp32's speed (CPU time per text); with these 7 of 24 nodes
# (35% of the multiply-adds) in fp32: mean 0.997, min 0.988 (parity set 0.982), at 1.34 x.
DEFAULT_RECIPE = Int8Recipe(
    exclude=(
        r"/layer\.0/attention/output/dense/",
        r"/layer\.[012]/output/dense/",
        r"/layer\.[234]/intermediate/dense/",
    )
)


class Int8ParityError(RuntimeError):
    """The int8 model drifts too far from the original; it is not written."""


@dataclass(frozen=True)
class Int8Parity:
    mean_cosine: float
    min_cosine: float
    worst_text: str

    def check(self, min_mean: float = MIN_MEAN_COSINE_INT8, min_each: float = MIN_COSINE_INT8) -> None:
        if not (self.mean_cosine >= min_mean and self.min_cosine >= min_each):
            raise Int8ParityError(
                f"int8 parity failed: cosine to the original mean {self.mean_cosine:.5f} (needs {min_mean}), "
                f"min {self.min_cosine:.5f} (needs {min_each}) on {self.worst_text!r}"
            )


def excluded_nodes(model_path: Path, recipe: Int8Recipe) -> list[str]:
    """Names of the nodes of quantisable type that `recipe.exclude` keeps in fp32."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    patterns = [re.compile(p) for p in recipe.exclude]
    return [
        n.name
        for n in model.graph.node
        if n.op_type in recipe.op_types and any(p.search(n.name) for p in patterns)
    ]


def quantize_int8(fp32_path: Path, out_path: Path, recipe: Int8Recipe = DEFAULT_RECIPE) -> dict[str, str]:
    """Write the int8 model of the fused fp32 model at `fp32_path`; returns the recipe as recorded."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = excluded_nodes(fp32_path, recipe)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on the root logger
    try:
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            # The fused graph has contrib ops whose outputs ONNX shape inference cannot type; they are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    counts = quantized_operator_counts(out_path)
    if counts.get("QAttention", 0) == 0 and "Attention" in recipe.op_types:
        raise Int8ParityError(f"quantisation kept no fused attention (operators: {counts})")
    log.debug("int8 model: %s; %d nodes left in fp32", counts, len(excluded))
    return recipe.describe(excluded)


def quantized_operator_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QAttention", "MatMulInteger", "Attention", "MatMul", "DynamicQuantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def measure_parity(
    texts: Sequence[str],
    reference: np.ndarray,
    embed: Callable[[list[str]], np.ndarray],
    batch: int = PARITY_BATCH,
) -> Int8Parity:
    """Cosine of `embed`'s vectors to `reference` (rows of `texts`), run in length-sorted batches."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    got = np.empty_like(reference)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        got[rows] = embed([texts[i] for i in rows])
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    cosine = np.sum(a * b, axis=1)
    worst = int(np.argmin(cosine))
    return Int8Parity(round(float(cosine.mean()), 7), round(float(cosine.min()), 7), texts[worst])


# Real sentences for the int8 gate, beside the exporter's PARITY_SENTENCES: questions to a bank, short
# opinions in the lower-cased, tokenized style of SST-2, chat fragments of one or two words, and prose. Very
# short texts are the hardest for int8 (mean pooling has only a few tokens to average the error over), so
# they are well represented.
INT8_PARITY_SENTENCES = [
    "How do I top up my card with a bank transfer?",
    "My card was charged twice for the same purchase.",
    "Can I change my PIN at an ATM?",
    "The exchange rate you gave me for euros was wrong.",
    "Why is there a fee on my statement?",
    "I think someone has stolen my phone and my card.",
    "When will the refund show up in my account?",
    "Is it possible to have a second card for my partner?",
    "The app says my identity could not be verified.",
    "I want to close my account.",
    "cool ?",
    "thanks!",
    "yes please",
    "no",
    "this is so bad .",
    "oh come on .",
    "a gorgeous , witty , seductive movie .",
    "the story is too thin to hold our interest for two hours .",
    "it 's a charming and often affecting journey .",
    "an utterly incompetent conclusion to a fine series .",
    "just one bad idea after another .",
    "the performances are uniformly excellent , and the direction is sure-footed .",
    "Where is the nearest pharmacy?",
    "Meeting moved to 3pm, see you there.",
    "The river flooded the lower town after three days of rain.",
    "She plays the cello in a string quartet on weekends.",
    "Scientists found water ice in craters near the moon's south pole.",
    "Please reset my password, I am locked out.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "The new policy takes effect on the first of January and applies to all contracts signed after that "
    "date, including renewals of existing agreements.",
]
