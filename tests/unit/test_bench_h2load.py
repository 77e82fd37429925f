"""bench.h2load's reading of what h2load and the server say (the real run: tests/integration)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench.h2load import _duration, grpc_frame, read_log


def test_a_grpc_frame_is_the_message_behind_a_flag_and_its_length() -> None:
    frame = grpc_frame(b"\x0a\x03abc")
    assert frame[0] == 0  # not compressed
    assert struct.unpack(">I", frame[1:5]) == (5,)
    assert frame[5:] == b"\x0a\x03abc"
    assert grpc_frame(b"") == b"\0\0\0\0\0"


def test_the_log_gives_each_requests_time_in_ms(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("1733600000000000\t200\t1500\n1733600000000100\t200\t250\n\n1733600000000200\t-1\t\n")
    assert read_log(log) == [1.5, 0.25]  # a request without a duration (never answered) is left out


def test_the_window_is_h2loads_own_clock() -> None:
    out = "starting benchmark...\nfinished in 8.00s, 2155.88 req/s, 809.30KB/s\nrequests: 17247 total\n"
    assert _duration(out) == 8.0
    assert _duration("finished in 950.12ms, 10.00 req/s, 1KB/s") == pytest.approx(0.95012)
    assert _duration("no summary") is None
