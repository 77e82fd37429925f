"""Which backbones a server serves: the configured directories (the defaults exported on first start),
loaded, and named (by input kind unless named), each name and each backbone once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from headswap.server.config import ServerConfig
from headswap.server.inference.protocols import Backbone

log = logging.getLogger(__name__)


def ensure_backbone(config: ServerConfig, directory: Path | None = None) -> Path:
    """A backbone directory, exporting it on first start when it is one of the defaults: the text backbone
    (no --backbone, or its directory named) or MobileNetV2 at <home>/backbones/mobilenet_v2."""
    directory = directory or config.default_backbone_dir
    if (directory / "manifest.json").exists():
        return directory
    if directory.resolve() == config.default_image_backbone_dir.resolve():
        from headswap.server.export.image import export_mobilenet

        log.info("image backbone not found at %s: exporting MobileNetV2 once (fp32 and fp16)", directory)
        report = export_mobilenet(directory, cache=config.home / "cache")
    elif directory.resolve() == config.default_backbone_dir.resolve():
        from headswap.server.export.text import export_backbone

        log.info("default backbone not found at %s: exporting it once (fp32, fp16 and int8)", directory)
        report = export_backbone(directory)
    else:
        return directory
    log.info(report.summary())
    return directory


def backbone_dirs(config: ServerConfig) -> list[tuple[str, Path]]:
    """(name, directory) of every backbone to serve; an empty name is filled in by the input kind."""
    if not config.backbones:
        return [("", ensure_backbone(config))]
    for _, directory in config.backbones:
        if not (ensure_backbone(config, directory) / "manifest.json").exists():
            raise FileNotFoundError(
                f"--backbone {directory} is not an exported backbone (no manifest.json); run `headswap export "
                "--out DIR` (text) or `headswap export --image mobilenet_v2 --out DIR`, or leave --backbone unset "
                "for the default"
            )
    return list(config.backbones)


def load_backbones(config: ServerConfig) -> list[tuple[str, Backbone]]:
    from headswap.server.inference.onnx import load_backbone

    return [
        (
            name,
            load_backbone(
                directory,
                device=config.device,
                precision=config.precision,
                intra_op_threads=config.intra_op_threads,
                intra_op_spin=config.intra_op_spin,
                spare_core=config.overload_spare_core,
                max_image_bytes=config.limits.max_image_bytes,
                max_image_pixels=config.limits.max_image_pixels,
            ),
        )
        for name, directory in backbone_dirs(config)
    ]


def name_lanes(backbones: Sequence[tuple[str, Backbone]]) -> list[tuple[str, Backbone]]:
    """Unnamed backbones take their input kind's name; names and backbones must be unique."""
    named = [(name or backbone.manifest.input_kind, backbone) for name, backbone in backbones]
    names = [name for name, _ in named]
    for name in set(names):
        if names.count(name) > 1:
            raise ValueError(
                f"bad configuration: two backbones are served as {name!r}: name them with --backbone NAME=DIR"
            )
    weights = [backbone.weights for _, backbone in named]  # heads are bound to weights: one lane each
    if len(set(weights)) < len(weights):
        raise ValueError("bad configuration: the same backbone is given twice in --backbone")
    return named
