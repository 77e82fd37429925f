"""Image preprocessing on its own: colour modes, EXIF orientation, the DCT-scaled JPEG path, limits read from
the header. Uses the real exported backbone's manifest (size, resize, mean, std), no model."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFile

from headswap.server.domain import Input
from headswap.server.errors import InputError
from headswap.server.inference.image import IMAGE_COST, ImagePreprocessor
from headswap.server.manifest import BackboneManifest


@pytest.fixture(scope="module")
def pre(image_backbone_dir: Path) -> ImagePreprocessor:
    return ImagePreprocessor(
        BackboneManifest.load(image_backbone_dir), max_bytes=2_000_000, max_pixels=4_000_000
    )


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth, asymmetric test picture (gradients and a corner block), 400x300."""
    y, x = np.mgrid[0:300, 0:400]
    rgb = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], axis=-1).astype(np.uint8)
    rgb[:60, :80] = (250, 20, 20)
    return Image.fromarray(rgb)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pixels(pre: ImagePreprocessor, data: bytes) -> np.ndarray:
    (item,) = pre.prepare([Input(image=data)])
    assert item.cost == IMAGE_COST and item.payload.shape == (3, 224, 224)
    return np.asarray(item.payload)


def close(a: np.ndarray, b: np.ndarray, tolerance: float = 0.08) -> bool:
    """Mean absolute difference in normalised units (1 unit ~ 58 grey levels)."""
    return float(np.abs(a - b).mean()) < tolerance


def test_png_is_normalised_with_imagenet_statistics(pre: ImagePreprocessor) -> None:
    grey = Image.new("RGB", (300, 300), (124, 116, 104))  # ImageNet's mean colour
    assert np.abs(pixels(pre, encode(grey, "PNG"))).max() < 0.01


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_become_rgb(pre: ImagePreprocessor, photo: Image.Image, mode: str) -> None:
    """Each mode reads as Pillow's own RGB conversion of it (CMYK goes through a lossy JPEG)."""
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    converted = photo.convert(mode)
    reference = photo if mode == "CMYK" else converted.convert("RGB")
    assert close(
        pixels(pre, encode(converted, fmt, **({"quality": 95} if fmt == "JPEG" else {}))),
        pixels(pre, encode(reference, "PNG")),
    )


def test_jpeg_scaled_in_the_dct_domain_matches_a_full_decode(
    pre: ImagePreprocessor, photo: Image.Image
) -> None:
    big = photo.resize((1600, 1200))
    assert close(pixels(pre, encode(big, "JPEG", quality=95)), pixels(pre, encode(big, "PNG")), 0.05)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation(pre: ImagePreprocessor, photo: Image.Image, orientation: int, fmt: str) -> None:
    """Stored as a camera would store it (transformed, with the tag that undoes it): read upright."""
    stored_as = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = photo.transpose(stored_as[orientation]) if orientation in stored_as else photo
    exif = Image.Exif()
    exif[0x0112] = orientation
    options: dict[str, object] = {"exif": exif, **({"quality": 95} if fmt == "JPEG" else {})}
    upright = pixels(pre, encode(photo, "PNG"))
    assert close(pixels(pre, encode(stored, fmt, **options)), upright)
    if orientation != 1:
        assert not close(pixels(pre, encode(stored, fmt)), upright), "the test picture is symmetric"


def test_animated_gif_gives_the_first_frame(pre: ImagePreprocessor) -> None:
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    gif = encode(red, "GIF", save_all=True, append_images=[blue])
    assert close(pixels(pre, gif), pixels(pre, encode(red, "PNG")), 0.01)


def test_limits_come_from_the_header_before_decoding(
    image_backbone_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No decoded bomb, measured where it happens: no decoder runs on an image its header already refuses
    (the server's peak memory would depend on its allocator; whether a decoder ran does not)."""
    decoded: list[str] = []

    def spy(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            decoded.append(name)
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy("simplejpeg", simplejpeg.decode_jpeg))
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy("pillow", ImageFile.ImageFile.load))
    pre = ImagePreprocessor(
        BackboneManifest.load(image_backbone_dir), max_bytes=50_000_000, max_pixels=4_000_000
    )
    small = Image.new("RGB", (64, 48), (10, 200, 30))
    for fmt, decoder in (("JPEG", "simplejpeg"), ("PNG", "pillow")):  # the spies see every decode
        decoded.clear()
        pre.prepare([Input(image=encode(small, fmt))])
        assert decoder in decoded, (fmt, decoded)
    big = Image.new("RGB", (2100, 2000))  # 4.2 megapixels, over the limit of 4
    bombs = {fmt: (encode(big, fmt), "2100x2000") for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")}
    row = b"\x00" + bytes(8000 * 3)
    bombs["64-megapixel png bomb, 64 KB"] = (png_claiming(8000, 8000, row * 8000), "8000x8000")
    bombs["png claiming 400 megapixels"] = (png_claiming(20000, 20000, bytes(16)), "400000000 pixels")
    for name, (data, size) in bombs.items():
        decoded.clear()
        with pytest.raises(InputError, match=rf"inputs\[0\] is {size}( pixels)?, more than .* 4000000"):
            pre.prepare([Input(image=data)])
        assert decoded == [], f"{name}: decoded before it was refused"


def png_claiming(width: int, height: int, rows: bytes) -> bytes:
    """A PNG whose header says `width` x `height`, with `rows` (compressed) as its pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_refusals_name_the_input(pre: ImagePreprocessor, photo: Image.Image) -> None:
    good = encode(photo, "JPEG")
    cases = {
        b"": "is an empty image",
        b"\xff\xd8\xff" + bytes(2_000_000): "is 2000003 bytes, more than this server's limit of 2000000",
        encode(photo, "TIFF"): "is not an image of a supported format",
        good[: len(good) // 2]: "could not be decoded",
        b"GIF89a\x00\x00\x00\x00\x00\x00\x00;": "has no pixels (0x0)",
    }
    for data, message in cases.items():
        with pytest.raises(
            InputError, match=r"inputs\[2\] " + message.replace("(", r"\(").replace(")", r"\)")
        ) as caught:
            pre.prepare([Input(image=good), Input(image=good), Input(image=data)])
        assert caught.value.index == 2


def test_clip_keeps_images_whole(pre: ImagePreprocessor) -> None:
    item = Input(image=b"x" * 10)
    assert pre.clip(item) is item
