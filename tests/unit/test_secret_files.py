"""Secrets on disk (issue 26): a pepper file or TLS key that others can read gets a warning at start, as ssh
warns for private keys; one readable only by its owner (or the process's own group, as Kubernetes' fsGroup
mounts secrets) does not."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from headswap.server.config import AuthConfig, warn_if_readable_by_others


@pytest.mark.parametrize(
    ("mode", "warned"), [(0o600, False), (0o400, False), (0o640, False), (0o644, True), (0o604, True)]
)
def test_a_secret_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    pepper = tmp_path / "pepper"
    pepper.write_text("p" * 32)
    os.chmod(pepper, mode)  # 0o640: group-readable, by this process's own group (the file's, as created)
    with caplog.at_level(logging.WARNING):
        AuthConfig(mode="keys", pepper_file=pepper).load_pepper()
    assert any("readable by" in r.getMessage() for r in caplog.records) is warned
    if warned:
        assert f"chmod 600 {pepper}" in caplog.text and f"mode {mode:04o}" in caplog.text


def test_a_missing_file_is_left_to_the_read(tmp_path: Path) -> None:
    assert warn_if_readable_by_others(tmp_path / "nothing", "the TLS private key") is False
