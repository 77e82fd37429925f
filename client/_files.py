"""Images on disk for the command line: files and folders, and the folder-per-label layout of training sets.

The layout is the one Keras' `image_dataset_from_directory` and torchvision's `ImageFolder` read: one folder
per label under a root, the images anywhere below it (hidden files and other suffixes are skipped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def looks_like_images(items: Sequence[str]) -> bool:
    """True when every item names an image file or a folder (so `classify photo.jpg` means the photo)."""
    return bool(items) and all(
        Path(i).is_dir() or (Path(i).is_file() and Path(i).suffix.lower() in IMAGE_SUFFIXES) for i in items
    )


def image_paths(items: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to the images below them (sorted)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = _images_under(path)
            if not found:
                raise ValueError(f"{item}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise ValueError(f"{item}: no such file or folder")
    return paths


def labelled_folder(root: str) -> tuple[list[Path], list[str]]:
    """(image paths, labels) from ROOT/<label>/...: the label is the name of the folder under ROOT."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{root}: not a folder (expected one folder per label, the images inside)")
    paths: list[Path] = []
    labels: list[str] = []
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        found = _images_under(folder)
        paths.extend(found)
        labels.extend([folder.name] * len(found))
    if len({*labels}) < 2:
        names = ", ".join(f.name for f in folders) or "none"
        raise ValueError(
            f"{root}: needs one folder per label with images in at least two of them (found: {names})"
        )
    return paths, labels


def batches(
    paths: Sequence[Path], max_bytes: int = 4 * 1024 * 1024, max_items: int = 256
) -> Iterator[list[Path]]:
    """Consecutive runs of paths of at most `max_bytes` of files (a larger file goes alone) and `max_items`."""
    batch: list[Path] = []
    size = 0
    for path in paths:
        n = path.stat().st_size
        if batch and (size + n > max_bytes or len(batch) >= max_items):
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        yield batch
