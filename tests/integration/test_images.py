"""Images end to end on the real exported MobileNetV2, beside the real text backbone in one server, with the
real photos of the Oxford-IIIT Pet sample (../shared/data/oxford-pets-sample)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headswap.client import Client, FailedPrecondition, InvalidArgument
from tests.helpers import ServerProcess

Pets = list[tuple[Path, str, str]]
MAX_IMAGE_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def both(
    backbone_dir: Path, image_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server serving the text and the image backbone at once."""
    work = tmp_path_factory.mktemp("images")
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--backbone", str(image_backbone_dir), "--store", str(work / "store"),
        "--max-image-bytes", str(MAX_IMAGE_BYTES), "--warmup-rounds", "1", log_path=work / "server.log",
    )  # fmt: skip
    try:
        proc.wait_serving()
        yield proc
    finally:
        rc = proc.terminate()
    assert rc == 0, proc.log()


def split(pets: Pets, per_group: int) -> tuple[Pets, Pets]:
    """The first `per_group` photos of each breed to train on, the others to test on."""
    groups: dict[str, Pets] = defaultdict(list)
    for pet in pets:
        groups[pet[2]].append(pet)
    train = [p for g in groups.values() for p in g[:per_group]]
    test = [p for g in groups.values() for p in g[per_group:]]
    return train, test


def accuracy(client: Client, tenant: str, test: Pets, key: int) -> float:
    predictions = []
    for start in range(0, len(test), 32):
        predictions += client.classify(tenant, images=[p[0] for p in test[start : start + 32]])
    return float(np.mean([p.label == t[key] for p, t in zip(predictions, test, strict=True)]))


@pytest.fixture(scope="module")
def cats_vs_dogs(both: ServerProcess, pets: Pets) -> tuple[float, Pets]:
    train, test = split(pets, 5)
    with Client(both.target, timeout=300) as client:
        result = client.adapt_head("pets", images=[p[0] for p in train], labels=[p[1] for p in train])
        assert result.activated and result.stored_examples == len(train) == 185
        assert result.head is not None and result.head.labels == ("cats", "dogs")
        return accuracy(client, "pets", test, key=1), test


def test_cats_vs_dogs_on_half_the_photos(cats_vs_dogs: tuple[float, Pets]) -> None:
    """185 photos to train on (sent in several calls: they are 19 MB), 185 to test on."""
    score, test = cats_vs_dogs
    print(f"\ncats vs dogs: {score:.1%} correct on {len(test)} held-out photos")
    assert score >= 0.96


def test_image_heads_score_out_of_distribution_inputs(
    both: ServerProcess, cats_vs_dogs: tuple[float, Pets]
) -> None:
    """The pets head keeps its training photos' embeddings: a photo that is neither cat nor dog (scikit-learn's
    sample photos: a temple, a flower) is out of distribution; the pets' own test photos mostly are not."""
    from io import BytesIO

    from PIL import Image
    from sklearn.datasets import load_sample_images

    _, test = cats_vs_dogs
    off = []
    for array in load_sample_images().images:
        buffer = BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        off.append(buffer.getvalue())
    with Client(both.target, timeout=300) as client:
        threshold = client.get_head("pets").versions[-1].metrics.ood_threshold
        assert threshold is not None
        others = client.classify("pets", images=off)
        assert all(p.out_of_distribution and p.abstained and p.ood_score > threshold for p in others)
        inside = client.classify("pets", images=[p[0] for p in test[:32]])
        assert sum(p.out_of_distribution for p in inside) <= 4


def test_37_breeds_with_five_photos_each(both: ServerProcess, pets: Pets) -> None:
    train, test = split(pets, 5)
    with Client(both.target, timeout=300) as client:
        client.adapt_head("breeds", images=[p[0] for p in train], labels=[p[2] for p in train])
        score = accuracy(client, "breeds", test, key=2)
    print(f"\n37 breeds, 5 photos each: {score:.1%} correct on {len(test)} held-out photos (chance 2.7%)")
    assert score >= 0.6


def test_text_and_image_tenants_on_one_server(
    both: ServerProcess,
    cats_vs_dogs: tuple[float, Pets],
    banking77: dict[str, dict[str, list[str]]],
    backbone_dir: Path,
) -> None:
    intents = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
    texts = [t for i in intents for t in banking77["train"][i][:20]]
    labels = [i for i in intents for _ in range(20)]
    photo = cats_vs_dogs[1][0][0]
    with Client(both.target, timeout=120) as client:
        client.adapt_head("intents", texts, labels)
        (text_answer,) = client.classify("intents", ["my card has not arrived yet"])
        (image_answer,) = client.classify("pets", images=[photo])
        assert text_answer.label == "card_arrival" and image_answer.label == "cats"
        # Each answer comes from its own backbone; Embed routes by input kind, or by the name asked for.
        assert client.embed_full(["hello"]).backbone.served_as == "text"
        pixels = client.embed_full(images=[photo])
        assert pixels.backbone.served_as == "image" and pixels.embeddings.shape == (1, 1280)
        assert client.embed(["hello"], backbone="text").shape == (1, 384)
        with pytest.raises(
            InvalidArgument, match=r"inputs\[0\] is a text, but backbone 'image' takes images"
        ):
            client.embed(["hello"], backbone="image")
        with pytest.raises(InvalidArgument, match="no backbone named 'audio'"):
            client.embed(["hello"], backbone="audio")
        # A head answers only the kind of input it was trained on.
        with pytest.raises(InvalidArgument, match=r"inputs\[0\]"):
            client.classify("intents", images=[photo])
        with pytest.raises(InvalidArgument, match=r"inputs\[0\]"):
            client.classify("pets", ["a cat"])
        # A tenant's examples stay on one backbone unless replaced.
        with pytest.raises(FailedPrecondition, match="REPLACE"):
            client.adapt_head("intents", images=[photo, photo], labels=["a", "b"])
        heads = {h.tenant: h.backbone_fingerprint for h in client.list_heads()}
        text_info = client.embed_full(["hello"]).backbone
    # Each head records the embeddings it was trained on, as its server reported them (whatever precision
    # this machine's server chose), and the backbone family it is bound to.
    text_manifest = json.loads((backbone_dir / "manifest.json").read_text())
    assert heads["intents"] == text_info.fingerprint and heads["pets"] == pixels.backbone.fingerprint
    assert text_info.fingerprint != pixels.backbone.fingerprint
    assert text_info.weights_fingerprint == text_manifest["fingerprint"]


# -- untrusted bytes -------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, rows: bytes = b"\x00" * 16) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows, 9))
        + _chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def bad_images(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the message must say)."""
    rgb_row = b"\x00" + b"\x00" * 8000 * 3
    return {
        "empty": (b"", "empty"),
        "too many bytes": (b"\xff\xd8\xff" + os.urandom(MAX_IMAGE_BYTES + 1), f"limit of {MAX_IMAGE_BYTES}"),
        "png claiming 400 megapixels": (png_claiming(20000, 20000), "400000000 pixels"),
        "real 64-megapixel png bomb": (png_claiming(8000, 8000, rgb_row * 8000), "8000x8000 pixels"),
        "truncated jpeg": (photo[: len(photo) // 2], "could not be decoded"),
        "corrupt bytes": (os.urandom(5000), "not an image of a supported format"),
        "jpeg header then garbage": (b"\xff\xd8\xff\xe0" + os.urandom(3000), "could not be decoded"),
        "zero-size png": (png_claiming(0, 0), "no pixels"),
        "tiff": (encoded(Image.new("RGB", (32, 32)), "TIFF"), "not an image of a supported format"),
    }


def test_bad_images_are_refused_by_index_and_the_server_keeps_serving(
    both: ServerProcess, cats_vs_dogs: tuple[float, Pets]
) -> None:
    # That no bomb is decoded is measured where decoding happens, not in the server's peak memory (which
    # depends on its allocator): tests/unit/test_image_preprocessing.py spies on the decoders. Here, the
    # sizes in the messages come from the headers, and the server goes on serving.
    good = cats_vs_dogs[1][0][0].read_bytes()
    with Client(both.target, timeout=60) as client:
        before = client.get_head("pets")
        for name, (data, message) in bad_images(good).items():
            for call in (
                lambda data=data: client.embed(images=[good, data]),
                lambda data=data: client.classify("pets", images=[good, data]),
            ):
                with pytest.raises(InvalidArgument) as caught:
                    call()
                assert "inputs[1]" in caught.value.details and message in caught.value.details, (
                    name,
                    caught.value,
                )
            with pytest.raises(InvalidArgument) as caught:
                client.adapt_head("pets", images=[good, data], labels=["cats", "dogs"])
            assert "examples[1]" in caught.value.details and message in caught.value.details, (
                name,
                caught.value,
            )
            assert client.embed(images=[good]).shape == (1, 1280), f"not serving after {name}"
        after = client.get_head("pets")
    assert after == before, "a refused AdaptHead changed the tenant"


def test_animated_image_gives_its_first_frame(both: ServerProcess) -> None:
    red, blue = Image.new("RGB", (300, 300), (220, 30, 30)), Image.new("RGB", (300, 300), (30, 30, 220))
    animation = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    with Client(both.target) as client:
        got = client.embed(images=[animation, encoded(red, "PNG"), encoded(blue, "PNG")])
    assert float(got[0] @ got[1]) > 0.99 and float(got[0] @ got[2]) < float(got[0] @ got[1])


def test_exif_orientation_is_honoured(both: ServerProcess, pets: Pets) -> None:
    """A photo stored rotated with an EXIF orientation tag embeds like the upright photo."""
    upright = Image.open(pets[0][0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored turned 90 degrees the other way
    stored = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    plain = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95)
    with Client(both.target) as client:
        got = client.embed(images=[encoded(upright, "JPEG", quality=95), stored, plain])
    assert float(got[0] @ got[1]) > 0.99 > float(got[0] @ got[2])


# -- the command line ------------------------------------------------------------------------------------


def test_cli_adapt_a_folder_per_label_and_classify_a_photo(
    both: ServerProcess, pets: Pets, tmp_path: Path
) -> None:
    """`headswap adapt --images DIR` (Keras / torchvision layout) and `headswap classify photo.jpg`."""
    root = tmp_path / "photos"
    for path, species, _ in pets:
        if int(path.stem.rsplit("_", 1)[1]) % 3 == 0:  # a third of them, from every breed
            (root / species).mkdir(parents=True, exist_ok=True)
            (root / species / path.name).symlink_to(path)
    env = {**os.environ, "HEADSWAP_TARGET": both.target}
    cli = [sys.executable, "-m", "headswap.client.cli"]
    adapt = subprocess.run(
        [*cli, "adapt", "--tenant", "cli-pets", "--images", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert adapt.returncode == 0, adapt.stderr
    result = json.loads(adapt.stdout)
    assert result["activated"] and result["labels"] == 2
    # Not a terminal: plain progress lines, no bar redraws.
    assert "embedding:" in adapt.stderr and "\r" not in adapt.stderr
    held_out = [p for p, s, _ in pets if s == "cats" and int(p.stem.rsplit("_", 1)[1]) % 3 == 1][:3]
    classify = subprocess.run(
        [*cli, "classify", "--tenant", "cli-pets", *map(str, held_out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert classify.returncode == 0, classify.stderr
    rows = [json.loads(line) for line in classify.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in held_out]
    assert [r["labels"][0]["label"] for r in rows].count("cats") >= 2
    heads = subprocess.run(
        [*cli, "heads", "--tenant", "cli-pets"], capture_output=True, text=True, env=env, timeout=60
    )
    created = json.loads(heads.stdout)["versions"][0]["created_at"]
    assert created.endswith("+00:00") and "T" in created  # ISO 8601, UTC
