"""Progress of long commands: one bar on a terminal (tqdm, when installed), plain lines otherwise.

`headswap adapt`, `headswap embed` of a folder and `headswap export` report stages ("embedding", "training",
...) with done/total counts. On a terminal one bar is redrawn in place and relabelled per stage; when the
output is a file or a pipe (CI logs, `| tee`) each stage prints a line when it starts and when it ends.
"""

from __future__ import annotations

import sys
from typing import IO, Any


class ProgressReporter:
    def __init__(self, stream: IO[str] | None = None, *, quiet: bool = False, unit: str = "it") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.unit = unit
        self._bar: Any = None
        self._stage = ""
        self._first = (0, 0)
        self._done = 0
        self._total = 0
        self._extra: dict[str, str] = {}
        self._tqdm: Any = _tqdm() if not quiet and _is_terminal(self.stream) else None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, stage: str, done: int, total: int, **postfix: float | None) -> None:
        if self.quiet:
            return
        shown = {k: f"{v:.4g}" for k, v in postfix.items() if v is not None}
        if total == 0:  # a stage with nothing to do (every example's vector cached): said in words, not 0/0
            if stage != self._stage:
                self.close()
                self._stage, self._first, self._done, self._total = stage, (0, 0), 0, 0
                what = "all cached" if stage == "embedding" else "nothing to do"
                print(f"{stage}: {what}", file=self.stream, flush=True)
            return
        if self._tqdm is not None:
            self._draw(stage, done, total, shown)
            return
        if stage != self._stage:
            self._end_line()
            self._stage, self._first = stage, (done, total)
            print(f"{stage}: {done}/{total}", file=self.stream, flush=True)
        self._done, self._total, self._extra = done, total, shown

    def _draw(self, stage: str, done: int, total: int, shown: dict[str, str]) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=stage, unit=self.unit, file=self.stream, leave=True)
        if stage != self._stage:
            self._bar.reset(total=total)
            self._bar.set_description(stage, refresh=False)
            self._stage = stage
        self._bar.n = done
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()

    def _end_line(self) -> None:
        """The stage's last state, unless its first line said it all."""
        if self._stage and (self._done, self._total) != self._first:
            details = "".join(f" {k}={v}" for k, v in self._extra.items())
            print(f"{self._stage}: {self._done}/{self._total}{details}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.quiet:
            self._end_line()
        self._stage = ""


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _tqdm() -> Any:
    """tqdm's class, or None when it is not installed (the client needs only grpcio, protobuf and numpy)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
