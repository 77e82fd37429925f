"""The log handler: every record in order, the access lines of calls that went well written in batches."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator

import pytest

from headswap.server import logs
from headswap.server.logs import ACCESS, Handler
from headswap.server.rpc import interceptors


class Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[Handler, Stream]]:
    stream = Stream()
    handler = Handler(stream, delay_s=3600)  # held until written by what the test does, never by the clock
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in (ACCESS, "headswap.test")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield handler, stream
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = True
        handler.close()


def test_access_lines_of_calls_that_went_well_wait_to_be_written_together(
    logged: tuple[Handler, Stream],
) -> None:
    handler, stream = logged
    access = logging.getLogger(ACCESS)
    for i in range(100):
        access.info("Classify OK %d", i)
    assert stream.getvalue() == "" and stream.writes == 0
    handler.flush()
    assert stream.getvalue() == "".join(f"INFO headswap.access: Classify OK {i}\n" for i in range(100))
    assert stream.writes == 1


def test_any_other_record_writes_at_once_after_the_lines_before_it(logged: tuple[Handler, Stream]) -> None:
    _, stream = logged
    access, other = logging.getLogger(ACCESS), logging.getLogger("headswap.test")
    access.info("Classify OK")
    access.warning("Classify INVALID_ARGUMENT")
    assert stream.getvalue().splitlines() == [
        "INFO headswap.access: Classify OK",
        "WARNING headswap.access: Classify INVALID_ARGUMENT",
    ]
    access.info("Embed OK")
    other.info("SERVING on port 1")
    assert stream.getvalue().splitlines()[2:] == [
        "INFO headswap.access: Embed OK",
        "INFO headswap.test: SERVING on port 1",
    ]


def test_the_buffer_is_bounded_in_bytes(logged: tuple[Handler, Stream]) -> None:
    handler, stream = logged
    handler.max_bytes = 1000
    access = logging.getLogger(ACCESS)
    for _ in range(100):
        access.info("x" * 90)
    line = len("INFO headswap.access: ") + 90 + 1
    written = len(stream.getvalue())
    assert 100 * line - 1000 <= written < 100 * line and written % line == 0
    assert stream.writes == written // line // (1000 // line + 1)


def test_held_lines_are_written_within_the_delay_and_on_close() -> None:
    stream = Stream()
    handler = Handler(stream, delay_s=0.01)
    logger = logging.getLogger(ACCESS)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("Classify OK")
        deadline = time.monotonic() + 30
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "Classify OK\n"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = True
        handler.close()
    closing = Stream()
    held = Handler(closing, delay_s=3600)
    record = logging.LogRecord(ACCESS, logging.INFO, __file__, 1, "Embed OK", None, None)
    held.handle(record)
    assert closing.getvalue() == ""
    held.close()
    assert closing.getvalue() == "Embed OK\n"


def test_request_ids_are_random_and_never_repeat() -> None:
    ids = [interceptors._new_id() for _ in range(3 * interceptors._IDS_PER_DRAW + 5)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("worker", ["", "3"])
def test_the_direct_access_line_is_the_line_logging_writes(
    fmt: str, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Handler.access_ok` skips the LogRecord: what it writes must stay what the formatter makes of one."""
    monkeypatch.setattr(logs, "WORKER", worker)
    formatter = logs.TextFormatter() if fmt == "text" else logs.JsonFormatter()
    fields: dict[str, object] = {"request_id": "ab12", "rpc": "Classify", "code": "OK", "duration_ms": 1.234}
    record = logging.getLogger(ACCESS).makeRecord(
        ACCESS, logging.INFO, __file__, 1, "%s %s %.1fms%s", ("Classify", "OK", 1.234, ""), None, extra=fields
    )
    for created in (1733600000.25, 1733600000.999, 1733600061.0):  # a new second, a new minute
        record.created, record.msecs = created, float(int((created - int(created)) * 1000))
        direct = formatter.access_line(created, int(record.msecs), "Classify OK 1.2ms", fields)
        assert direct == formatter.format(record)


@contextlib.contextmanager
def configured(fmt: str) -> Iterator[Stream]:
    """The server's own set-up (logs.configure) and nothing else on the root logger (pytest's capturing
    handlers set aside), writing to a stream the test reads."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("INFO", fmt)
    stream = Stream()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        root.handlers[0].close()
        root.handlers[:], root.level = saved[0], saved[1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_call_that_went_well_is_logged_directly_and_anything_else_set_up_still_gets_it(fmt: str) -> None:
    with configured(fmt) as stream:
        _direct_then_not(stream, fmt)


def _direct_then_not(configured: Stream, fmt: str) -> None:
    import grpc

    from headswap.server.metrics import Metrics

    calls = interceptors.CallInterceptor(Metrics())
    access = logging.getLogger(ACCESS)
    handler = logs.direct_access(access)
    assert handler is logging.getLogger().handlers[0]  # the server's set-up takes the direct way
    calls._done("Classify", "ab12", grpc.StatusCode.OK, time.perf_counter(), "")
    handler.flush()
    (line,) = configured.getvalue().splitlines()
    assert "INFO headswap.access: Classify OK " in line if fmt == "text" else '"request_id": "ab12"' in line
    # Another handler (a log shipper, a test's capture) or a level above INFO: the usual way, so it sees it.
    captured: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = captured.append  # type: ignore[method-assign]
    access.addHandler(extra)
    try:
        assert logs.direct_access(access) is None
        calls._done("Classify", "cd34", grpc.StatusCode.OK, time.perf_counter(), "")
    finally:
        access.removeHandler(extra)
    assert [r.request_id for r in captured] == ["cd34"]  # type: ignore[attr-defined]
    access.setLevel(logging.WARNING)
    try:
        assert logs.direct_access(access) is None
        calls._done("Classify", "ef56", grpc.StatusCode.OK, time.perf_counter(), "")
    finally:
        access.setLevel(logging.NOTSET)
    handler.flush()
    assert "ef56" not in configured.getvalue() and configured.getvalue().count("Classify OK") == 2
