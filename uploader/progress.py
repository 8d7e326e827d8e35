"""Progress and summaries for long pushes, for people and for logs.

On a terminal one status line is redrawn in place; elsewhere (CI logs,
journald) nothing is redrawn and the engine's one-line-per-path log suffices.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from uploader.store import PathInfo

__all__ = ["PATH_EVENTS", "TerminalProgress", "human_bytes", "plural", "utc_time"]

# The logger of one line per store path (uploaded, attested, published):
# shown with -v; services log their other events without it.
PATH_EVENTS = "uploader.paths"


def utc_time(t: float) -> str:
    """``2024-05-01 03:00:12 UTC``: a Unix time as messages show it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 path``, ``2 paths``; ``many`` for irregular plurals (``entries``)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class TerminalProgress:
    """``[3/12] 40.1 MiB / 1.2 GiB  12.3 MiB/s`` redrawn on stderr (with no
    bytes to count, ``narinfos [3/12]  310/s``)."""

    def __init__(
        self, stream: TextIO = sys.stderr, *, min_interval: float = 0.1, label: str = ""
    ) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.label = label
        self.total_paths = 0
        self.total_bytes = 0
        self.done_paths = 0
        self.done_bytes = 0
        self._started = time.monotonic()
        self._last_draw = 0.0

    def start(self, total_paths: int, total_bytes: int) -> None:
        self.total_paths = total_paths
        self.total_bytes = total_bytes
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, info: PathInfo, uploaded: bool) -> None:
        self.step(1, info.nar_size)

    def step(self, items: int, nbytes: int) -> None:
        self.done_paths += items
        self.done_bytes += nbytes
        self._draw(force=self.done_paths == self.total_paths)

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        line = f"{self.label} " if self.label else ""
        line += f"[{self.done_paths}/{self.total_paths}] "
        if self.total_bytes:
            line += (
                f"{human_bytes(self.done_bytes)} / {human_bytes(self.total_bytes)}  "
                f"{human_bytes(self.done_bytes / elapsed)}/s"
            )
        else:
            line += f" {self.done_paths / elapsed:.0f}/s"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def finish(self) -> None:
        if self.total_paths:
            self.stream.write("\n")
            self.stream.flush()
