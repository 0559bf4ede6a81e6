"""Bounded logging for the policy server: what a hostile or broken peer can make it write.

- ``RateLimitFilter``: each kind of message (logger + message template) is
  written at most once per interval, as one line (no traceback for the
  event-loop and uvicorn loggers); the next one says how many were dropped.
  A flood of connections past the file limit is then a line every few
  seconds, not megabytes of tracebacks.
- ``AccessLogRedactor``: the access log never shows a query string (a client
  may put a key there) and never a path longer than a line.
- ``printable``: any peer-controlled text is shortened before it is logged or
  echoed in an error body.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

MAX_ECHO_CHARS = 300
MAX_LOGGED_PATH_CHARS = 200
RATE_LIMIT_INTERVAL_S = 10.0
# Loggers whose records come from the network or the event loop, not from our code.
NOISY_LOGGERS = ("asyncio", "uvicorn.error", "manipulation_policy.policy_server")


def printable(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, valid Unicode (lone surrogates replaced)."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters in all)"
    return text.encode("utf-8", "replace").decode("utf-8")


class RateLimitFilter(logging.Filter):
    """Lets each kind of record through at most once per ``interval_s``."""

    def __init__(
        self,
        interval_s: float = RATE_LIMIT_INTERVAL_S,
        keep_traceback: bool = False,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1024,
    ):
        super().__init__()
        self.interval_s = interval_s
        self.keep_traceback = keep_traceback
        self._clock = clock
        self._max_kinds = max_kinds
        self._lock = threading.Lock()
        # kind -> [time last written, records dropped since]
        self._kinds: dict[tuple, list] = {}

    @staticmethod
    def _kind(record: logging.LogRecord) -> tuple:
        first_line = str(record.msg).split("\n", 1)[0][:200]
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return (record.name, first_line, exc_type)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._kind(record)
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.interval_s:
                seen[1] += 1
                return False
            dropped = seen[1] if seen is not None else 0
            if seen is None and len(self._kinds) >= self._max_kinds:
                self._kinds.clear()  # bounded memory; worst case some repeats get through
            self._kinds[kind] = [now, 0]
        self._to_one_line(record, dropped)
        return True

    def _to_one_line(self, record: logging.LogRecord, dropped: int) -> None:
        message = printable(record.getMessage(), 8000 if self.keep_traceback else 2000)
        if record.exc_info and not self.keep_traceback:
            exc = record.exc_info[1]
            message = message.split("\n", 1)[0]
            if exc is not None:
                message += f": {type(exc).__name__}: {printable(str(exc), 200)}"
            record.exc_info = None
            record.exc_text = None
        if dropped:
            message += f" ({dropped} more like this in the last {self.interval_s:g} s not shown)"
        record.msg, record.args = message, ()


class AccessLogRedactor(logging.Filter):
    """uvicorn's access record is (client, method, path with query, version, status):
    the query is replaced and the path clipped."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, has_query, _ = args[2].partition("?")
            path = printable(path, MAX_LOGGED_PATH_CHARS)
            if has_query:
                path += "?<query hidden>"
            record.args = (args[0], printable(str(args[1]), 20), path, args[3], args[4])
        return True


def install(loggers: Iterable[str] = NOISY_LOGGERS, interval_s: float = RATE_LIMIT_INTERVAL_S):
    """Put the filters on the server's loggers (after uvicorn has configured logging)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            keep = name.startswith("manipulation_policy")
            logger.addFilter(RateLimitFilter(interval_s, keep_traceback=keep))
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogRedactor) for f in access.filters):
        access.addFilter(AccessLogRedactor())
