"""The client's side of images and large training sets: inputs from bytes or paths, examples split into
calls, folder-per-label layouts, progress on a terminal and in a log, times as datetimes."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest

from headswap.client import _codec, _files
from headswap.client._base import BaseClient
from headswap.client._progress import ProgressReporter
from headswap.client.results import AdaptProgress
from headswap.v1 import headswap_pb2 as pb


def test_images_as_bytes_or_paths(tmp_path: Path) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"\xff\xd8\xffjpeg")
    inputs = _codec.inputs(None, [photo, str(photo), b"png", bytearray(b"bmp"), memoryview(b"gif")], "embed")
    assert [i.image for i in inputs] == [b"\xff\xd8\xffjpeg"] * 2 + [b"png", b"bmp", b"gif"]
    assert [i.text for i in _codec.inputs(["a"], None, "embed")] == ["a"]


@pytest.mark.parametrize(
    ("texts", "images", "message"),
    [
        (None, None, "texts or images"),
        (["a"], [b"x"], "texts or images"),
        ("a text", None, "not a single string"),
        (None, b"one image", "not a single one"),
        (None, "one.jpg", "not a single one"),
        (None, [3], "not int"),
    ],
)
def test_inputs_refused_before_sending(texts: object, images: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        _codec.inputs(texts, images, "embed")  # type: ignore[arg-type]


def test_a_large_training_set_goes_in_several_calls() -> None:
    images = [bytes([i]) * 1000 for i in range(10)]
    request = _codec.adapt_request("t", None, images, ["a", "b"] * 5, {"replace": True, "kind": "mlp"})
    parts = _codec.split_adapt(request, chunk_bytes=3500)
    assert [len(p.examples) for p in parts] == [3, 3, 3, 1]
    assert [p.store_only for p in parts] == [True, True, True, False]
    assert [p.mode for p in parts] == [pb.EXAMPLE_MODE_REPLACE] + [pb.EXAMPLE_MODE_ADD] * 3
    assert all(p.options.kind == pb.HEAD_KIND_MLP and p.tenant == "t" for p in parts)
    assert [e for p in parts for e in p.examples] == list(request.examples)
    assert _codec.split_adapt(request) == [request]  # small enough for one call
    huge = _codec.adapt_request("t", None, [b"x" * 5000, b"y"], ["a", "b"], {})
    assert [len(p.examples) for p in _codec.split_adapt(huge, chunk_bytes=3500)] == [1, 1]


def test_progress_of_several_calls_is_progress_of_the_whole() -> None:
    request = _codec.adapt_request("t", None, [b"x" * 1000] * 10, ["a", "b"] * 5, {})
    parts = _codec.split_adapt(request, chunk_bytes=3500)
    seen: list[tuple[str, int, int]] = []
    for i in range(len(parts)):
        report = BaseClient._chunk_progress(lambda p: seen.append((p.stage, p.done, p.total)), parts, i)
        assert report is not None
        report(AdaptProgress("embedding", 0, 3, 0.0, None, None))
        report(AdaptProgress("embedding", 3 if i < 3 else 1, 3 if i < 3 else 1, 0.0, None, None))
    report(AdaptProgress("training", 5, 100, 0.5, None, None))
    assert seen[:2] == [("embedding", 0, 10), ("embedding", 3, 10)]
    assert seen[-3:] == [("embedding", 9, 10), ("embedding", 10, 10), ("training", 5, 100)]


def test_created_at_is_a_utc_datetime_also_from_older_servers() -> None:
    new = pb.HeadVersion(version=1, created_at_unix=1.5)
    new.created_at.FromNanoseconds(1_500_000_000)
    old = pb.HeadVersion(version=1, created_at_unix=1.5)
    expected = dt.datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=dt.UTC)
    assert _codec.head_version(new).created_at == _codec.head_version(old).created_at == expected


def test_folder_per_label(tmp_path: Path) -> None:
    for name in (
        "cats/a.jpg",
        "cats/sub/b.PNG",
        "dogs/c.jpeg",
        "dogs/.hidden.jpg",
        "dogs/notes.txt",
        ".git/x.jpg",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    paths, labels = _files.labelled_folder(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "cats/a.jpg",
        "cats/sub/b.PNG",
        "dogs/c.jpeg",
    ]
    assert labels == ["cats", "cats", "dogs"]
    with pytest.raises(ValueError, match="at least two"):
        _files.labelled_folder(str(tmp_path / "cats"))
    assert _files.looks_like_images([str(tmp_path / "cats/a.jpg"), str(tmp_path / "dogs")])
    assert not _files.looks_like_images(["a cat sat on the mat"])
    assert not _files.looks_like_images([str(tmp_path / "dogs/notes.txt")])
    assert _files.image_paths([str(tmp_path)]) == paths  # hidden files and folders skipped
    with pytest.raises(ValueError, match="no such file"):
        _files.image_paths([str(tmp_path / "missing.jpg")])


def test_batches_by_bytes_and_count(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate([10, 10, 30, 5, 5, 5]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b"x" * size)
    assert [len(b) for b in _files.batches(paths, max_bytes=25, max_items=2)] == [2, 1, 2, 1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with ProgressReporter(out) as progress:
        for done in range(0, 11):
            progress.update("embedding", done, 10)
        for epoch in range(1, 4):
            progress.update("training", epoch, 100, loss=0.5 / epoch, val_acc=None)
    assert out.getvalue().splitlines() == [
        "embedding: 0/10",
        "embedding: 10/10",
        "training: 1/100",
        "training: 3/100 loss=0.1667",
    ]


def test_progress_says_all_cached_instead_of_zero_of_zero() -> None:
    out = io.StringIO()
    with ProgressReporter(out) as progress:
        progress.update("embedding", 0, 0)
        progress.update("training", 1, 100, loss=0.5)
        progress.update("training", 100, 100, loss=0.1)
    assert out.getvalue().splitlines() == [
        "embedding: all cached",
        "training: 1/100",
        "training: 100/100 loss=0.1",
    ]


def test_counts_of_a_chunked_upload_are_the_whole_calls() -> None:
    """370 photos in three calls: the first two embed and store theirs, the last trains on all 370 (369 of
    them cached by the first two calls): the result says 370 embedded, 0 cache hits, not 1 and 369."""
    from headswap.client._base import BaseClient
    from headswap.client.results import AdaptResult

    parts = [
        AdaptResult("pets", None, False, 0, embedded=150, cache_hits=0),
        AdaptResult("pets", None, False, 0, embedded=219, cache_hits=0),
        AdaptResult("pets", None, True, 1, embedded=1, cache_hits=369, stored_examples=370),
    ]
    whole = BaseClient._whole_call(parts)
    assert (whole.embedded, whole.cache_hits, whole.stored_examples, whole.activated) == (370, 0, 370, True)
    again = [AdaptResult("pets", None, False, 0, 0, 150), AdaptResult("pets", None, True, 1, 0, 370)]
    assert (BaseClient._whole_call(again).embedded, BaseClient._whole_call(again).cache_hits) == (0, 370)


def test_progress_one_bar_on_a_terminal() -> None:
    out = Terminal()
    with ProgressReporter(out) as progress:
        progress.update("embedding", 5, 10)
        progress.update("training", 50, 100, loss=0.25)
    text = out.getvalue()
    assert "\r" in text and "training" in text and "loss=0.25" in text
    assert text.count("\n") <= 1, "one bar redrawn in place, not a line per step"


def test_quiet_progress_prints_nothing() -> None:
    out = Terminal()
    with ProgressReporter(out, quiet=True) as progress:
        progress.update("embedding", 5, 10)
    assert out.getvalue() == ""
