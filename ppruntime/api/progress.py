"""A minimal progress bar for `generate` on rank 0 (quiet when not a terminal)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last_draw = 0.0
        if self.enabled and total:
            self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._last_draw > 0.1 or self.done == self.total):
            self._draw()

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        elapsed = self._last_draw - self.start
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        sys.stderr.write(
            f"\rgenerate [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} requests, {rate:.1f} req/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
