"""Image preprocessing: untrusted bytes to the backbone's normalised pixels, in the preprocessing pool.

JPEG goes through simplejpeg, which decodes straight to a smaller size in the DCT domain (about twice as
fast as a full decode and resize for a photo); everything else through Pillow, restricted to an allow-list
of formats. EXIF orientation is honoured; grayscale, CMYK, palettes and alpha become RGB; an animated
image gives its first frame. Before anything is decoded the header is read: more bytes or pixels than the
limits allow, zero-sized images and formats off the list are refused with INVALID_ARGUMENT naming the input,
so a 400-megapixel PNG costs a header read, not 1.2 GB of memory. Then: shorter side to `resize`, centre
crop of `image_size`, (x/255 - mean) / std, CHW float32.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headswap.server.domain import Input
from headswap.server.errors import InputError
from headswap.server.inference.protocols import Prepared
from headswap.server.input_kinds import InputLimits
from headswap.server.manifest import BackboneManifest

FORMATS = ("PNG", "WEBP", "GIF", "BMP")  # besides JPEG; TIFF and the rest are refused
IMAGE_COST = 256  # a batch's cost budget counts an image as 256 units (16 images in the CPU default of 4096)
EXIF_ORIENTATION = 0x0112


def from_backbone(directory: Path, manifest: BackboneManifest, limits: InputLimits) -> ImagePreprocessor:
    """The image kind's preprocessor (`input_kinds.IMAGE`): the manifest's size, mean and std."""
    return ImagePreprocessor(manifest, limits.max_image_bytes, limits.max_image_pixels)


class ImagePreprocessor:
    input_kind = "image"

    def __init__(
        self, manifest: BackboneManifest, max_bytes: int = 20 * 1024 * 1024, max_pixels: int = 40_000_000
    ) -> None:
        self.size = manifest.image_size
        self.resize = manifest.resize
        mean = np.asarray(manifest.mean, dtype=np.float32)
        std = np.asarray(manifest.std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)  # per channel, on HWC pixels
        self._offset = (-mean / std).astype(np.float32)
        self.input_name = manifest.input_names[0]
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def clip(self, item: Input) -> Input:
        return item  # an image is refused, never cut

    def prepare(self, inputs: Sequence[Input]) -> list[Prepared]:
        return [
            Prepared(self._pixels(i, item.content if isinstance(item.content, bytes) else b""), IMAGE_COST, 0)
            for i, item in enumerate(inputs)
        ]

    def collate(
        self, items: Sequence[Prepared], shape: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        pixels = np.stack([item.payload for item in items])
        rows = shape[0] if shape is not None else len(items)
        if rows > len(items):  # a bucket's spare rows: zeros (the mean colour), outputs dropped
            pixels = np.concatenate([pixels, np.zeros((rows - len(items), *pixels.shape[1:]), pixels.dtype)])
        return {self.input_name: pixels}

    def placeholder(self, length: int) -> Prepared:
        return Prepared(np.zeros((3, self.size, self.size), dtype=np.float32), IMAGE_COST, 0)

    def warm_up_batches(self, items: int) -> list[list[Input]]:
        import simplejpeg

        noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        photo = Input(image=simplejpeg.encode_jpeg(noise, quality=85))
        return [[photo], [photo] * items]

    # -- decoding ---------------------------------------------------------------------------------------

    def _pixels(self, index: int, data: bytes) -> np.ndarray:
        if not data:
            raise InputError(index, "is an empty image: send the encoded bytes")
        if len(data) > self.max_bytes:
            raise InputError(
                index, f"is {len(data)} bytes, more than this server's limit of {self.max_bytes} per image"
            )
        try:
            rgb = (
                self._decode_jpeg(index, data)
                if data[:3] == b"\xff\xd8\xff"
                else self._decode_other(index, data)
            )
        except InputError:
            raise
        except Exception as exc:  # every decoder fails its own way on damaged bytes
            raise InputError(
                index, f"could not be decoded ({type(exc).__name__}: {exc}): send a whole JPEG or PNG"
            ) from None
        return self._normalise(rgb)

    def _check_size(self, index: int, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InputError(index, f"has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise InputError(
                index,
                f"is {width}x{height} pixels, more than this server's limit of {self.max_pixels} per image",
            )

    def _decode_jpeg(self, index: int, data: bytes) -> np.ndarray:
        import simplejpeg

        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        self._check_size(index, width, height)
        # The DCT-domain scaling keeps both sides at least `resize`: the smallest decode that loses nothing.
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=self.resize, min_width=self.resize)
        return _orient(rgb, _jpeg_orientation(data))

    def _decode_other(self, index: int, data: bytes) -> np.ndarray:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=FORMATS)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
                # Pillow's own guard, from the header alone (past ~89 megapixels): say it in our terms.
                claimed = re.search(r"\((\d+) pixels\)", str(exc))
                raise InputError(
                    index,
                    f"is {claimed.group(1) if claimed else 'too many'} pixels, more than this server's limit "
                    f"of {self.max_pixels} per image",
                ) from None
            except Exception:
                size = _png_or_gif_size(data)
                if size is not None and 0 in size:
                    raise InputError(index, f"has no pixels ({size[0]}x{size[1]})") from None
                raise InputError(
                    index, f"is not an image of a supported format (JPEG, {', '.join(FORMATS)})"
                ) from None
            self._check_size(index, *image.size)
            image.seek(0)  # an animation's first frame
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            rgb = image.convert("RGB")  # grayscale, palette, CMYK, alpha
        return _orient(np.asarray(rgb), orientation)

    def _normalise(self, rgb: np.ndarray) -> np.ndarray:
        """Shorter side to `resize`, centre crop of `size`, (x/255 - mean)/std, CHW. Only the crop's region
        is resampled (Pillow's resize with a source box: the same samples as resizing all and cropping,
        at the cost of the crop), and the arithmetic is one multiply-add per value."""
        from PIL import Image

        height, width = rgb.shape[:2]
        scale = self.resize / min(height, width)
        full = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        left, top = (full[0] - self.size) // 2, (full[1] - self.size) // 2
        sx, sy = width / full[0], height / full[1]
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        crop = Image.fromarray(rgb).resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        hwc = np.asarray(crop, dtype=np.float32) * self._scale + self._offset
        return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _png_or_gif_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR or a GIF's screen descriptor, without decoding anything."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    return None


def _jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG, from its header alone."""
    from PIL import Image

    try:
        return int(Image.open(io.BytesIO(data), formats=("JPEG",)).getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1  # no or unreadable EXIF: as stored


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    from PIL import Image

    methods = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }
    method = methods.get(orientation)
    return rgb if method is None else np.asarray(Image.fromarray(rgb).transpose(method))
