"""`--cpu-policy`: every thread of the process under SCHED_BATCH, those made before and after alike."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from headswap.server import scheduling


def test_normal_changes_nothing() -> None:
    before = scheduling.current()
    assert scheduling.apply("normal") == 0
    assert scheduling.current() == before


def test_batch_holds_for_threads_made_before_and_after_and_for_child_processes() -> None:
    """In a process of its own: the test process keeps its own scheduling."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys, threading
        from headswap.server import scheduling
        ready, done = threading.Event(), threading.Event()
        tids = []
        def before():
            tids.append(threading.get_native_id()); ready.set(); done.wait()
        t = threading.Thread(target=before); t.start(); ready.wait()
        assert scheduling.current(tids[0]) == "normal"
        assert scheduling.apply("batch") >= 2  # this thread and the one already running
        after = []
        u = threading.Thread(target=lambda: after.append(scheduling.current()))
        u.start(); u.join()
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.sched_getscheduler(0) == os.SCHED_BATCH)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        print(scheduling.current(), scheduling.current(tids[0]), after[0], child)
        done.set(); t.join()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["batch", "batch", "batch", "True"]


def test_an_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="normal, batch"):
        scheduling.apply("fifo")


def test_batch_without_linux_says_so_and_the_server_does_not_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "sched_setscheduler", raising=False)
    with pytest.raises(ValueError, match="needs Linux"):
        scheduling.apply("batch")
    with caplog.at_level(logging.ERROR, logger="headswap.server.scheduling"):
        assert scheduling.applied("batch") is False
    assert "start-up failed: --cpu-policy batch needs Linux" in caplog.text
    assert scheduling.applied("normal") is True
