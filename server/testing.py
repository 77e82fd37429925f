"""Test-only, not part of the server's API: real headswap servers for tests, benchmarks and evaluations,
ours and yours (README, "Testing your code against a real server"). Nothing the server runs imports it; it
ships in the package because bench/ and eval/ start servers with it at run time.

    from headswap.server.testing import serve

    with serve("--backbone", "/path/to/backbone") as server:   # `headswap serve` in a child process
        with Client(server.target) as client:
            client.embed(["hello"])

The child listens on a free loopback port (`--port 0`, read back from its log) with a temporary store
unless `--store` or `store=` names one, and is stopped with SIGTERM (SIGKILL after the timeout) on exit.
`in_process` starts one inside the running event loop instead, from a `ServerConfig`, optionally with a
given backbone and store (`headswap.server.inference.fake.fake_backbone()` and
`headswap.server.store.memory.MemoryStore()` make it start in milliseconds).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from headswap.server.app import Server, build
from headswap.server.config import ServerConfig
from headswap.server.inference.protocols import Backbone
from headswap.server.store import HeadStore

_LISTENING = re.compile(r"gRPC listening on port (\d+)")


def free_port() -> int:
    """A port free on loopback now (for servers that cannot be given port 0, like Prometheus)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`headswap serve ARGS` in a child process, as an operator would run it. Starts at once."""

    def __init__(
        self,
        *args: str,
        store: Path | str | None = None,
        log_path: Path | None = None,
        metrics_port: int = 0,
        env: Mapping[str, str] | None = None,
        module: str = "headswap.client.cli",
    ) -> None:
        self.flags = tuple(args)
        self._tmp = Path(tempfile.mkdtemp(prefix="headswap-server-"))
        if store is None and "--store" not in args:
            store = self._tmp / "store"
        self.store = store
        self.log_path = log_path or self._tmp / "server.log"
        self.metrics_port = metrics_port
        self._port = 0
        self._log: IO[bytes] = self.log_path.open("wb")
        command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--metrics-port", str(metrics_port), *args]
        if store is not None:
            command += ["--store", str(store)]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        """The gRPC port, once the server listens (waits for it)."""
        deadline = time.monotonic() + 300
        while not self._port:
            match = _LISTENING.search(self.log())
            if match:
                self._port = int(match.group(1))
            elif self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before listening:\n{self.log()}"
                )
            elif time.monotonic() > deadline:
                raise TimeoutError(f"server not listening after 300s:\n{self.log()}")
            else:
                time.sleep(0.02)
        return self._port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 300.0) -> ServerProcess:
        from headswap.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.target) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    client.wait_ready(timeout=1.0)
                    return self
                except TimeoutError as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{exc} after {timeout:.0f}s:\n{self.log()}") from None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait (SIGKILL after `timeout`); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._log.close()
        shutil.rmtree(self._tmp / "store", ignore_errors=True)
        if not self.log_path.is_relative_to(self._tmp):  # a log kept there stays for the caller to read
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self.wait_serving()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.terminate()
        else:
            self._close()


@contextmanager
def serve(*args: str, **kwargs: Any) -> Iterator[ServerProcess]:
    """A `ServerProcess`, SERVING, stopped on the way out."""
    with ServerProcess(*args, **kwargs) as server:
        yield server


@dataclass(frozen=True)
class InProcess:
    server: Server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def in_process(
    config: ServerConfig | None = None,
    *,
    backbone: Backbone | Sequence[tuple[str, Backbone]] | None = None,
    store: HeadStore | None = None,
) -> AsyncIterator[InProcess]:
    """A server in this event loop on a free loopback port; no metrics port, no warm-up unless configured.
    `backbone`: one, or (name, backbone) pairs to serve several."""
    with tempfile.TemporaryDirectory(prefix="headswap-server-") as tmp:
        if config is None:
            config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, warmup_rounds=0, home=Path(tmp))
        server = build(
            replace(config, host="127.0.0.1", port=0, metrics_port=0), backbone=backbone, store=store
        )
        try:
            await server.start()
            yield InProcess(server)
        finally:
            await server.stop()
