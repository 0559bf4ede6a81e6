"""A one-line progress bar on stderr for long bags (messages read of the bag's total)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
MIN_INTERVAL_SEC = 0.2


class Progress:
    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr):
        self._total = max(total, 1)
        self._done = 0
        self._enabled = enabled
        self._stream = stream
        self._shown_at = 0.0

    def advance(self) -> None:
        self._done += 1
        now = time.monotonic()
        if self._enabled and now - self._shown_at >= MIN_INTERVAL_SEC:
            self._shown_at = now
            self._show()

    def _show(self) -> None:
        share = min(1.0, self._done / self._total)
        filled = round(WIDTH * share)
        self._stream.write(f"\rreplay [{'#' * filled}{'.' * (WIDTH - filled)}] "
                           f"{100 * share:5.1f} % {self._done}/{self._total} messages")
        self._stream.flush()

    def close(self) -> None:
        if self._enabled:
            self._show()
            self._stream.write("\n")
            self._stream.flush()
