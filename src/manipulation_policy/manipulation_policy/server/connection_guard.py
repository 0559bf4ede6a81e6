"""Which connections the server keeps: the bounds that no client behaviour can defeat.

Pure bookkeeping, no sockets and no event loop (``http_protocol.py`` is the glue to
uvicorn). A connection is in one of three states:

- *waiting*: open, or done with its last answer, and its next request's headers are
  not complete yet (idle, or still sending headers). It can be closed at no loss to
  anyone but a client that is slow or silent, so it is what gives way when the
  connections reach their cap: the one waiting longest is closed first.
- *reading a body*: headers complete, body still arriving. These are bounded by
  ``max_body_readers``; a body that arrived with its headers needs no place.
- *served*: the application has the whole request (or is answering it).

Admission to the model's queue happens only in the last state, so a client still
sending its body holds no place there.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Optional

DEFAULT_IDLE_TIMEOUT_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_MAX_BODY_READERS = 64
# Set in the scope of a request handed to the application before its body was read
# (because it will be refused at once): such a request must never be admitted.
BODY_UNREAD = "manipulation_policy.body_unread"
# Descriptors kept free below the open-file limit when the cap is derived from it:
# log files, the model's files, CUDA's device files, the event loop's own.
MIN_DESCRIPTOR_RESERVE = 32


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # A body holding a reader place must arrive at this many bytes per second on
    # average (checked each second; 0: no minimum).
    body_min_rate: float = 0.0
    # Bodies under way past this many bytes are handed to the application (which
    # refuses them with 413) instead of being buffered further.
    max_buffered_body_bytes: int = 8 * 1024 * 1024
    max_body_readers: int = DEFAULT_MAX_BODY_READERS
    max_connections: Optional[int] = None  # None: no cap (in-process apps, tests)

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {value}")
        if not 0 <= self.body_min_rate < math.inf:
            raise ValueError(f"body_min_rate must be >= 0 and finite, got {self.body_min_rate}")
        if self.max_body_readers < 1 or self.max_buffered_body_bytes < 1:
            raise ValueError("max_body_readers and max_buffered_body_bytes must be >= 1")
        if self.max_connections is not None and self.max_connections <= self.max_body_readers:
            raise ValueError(
                f"max_connections ({self.max_connections}) must be above max_body_readers "
                f"({self.max_body_readers}): connections that are not reading a body must "
                "always find room (a /health probe among them)"
            )


def descriptor_reserve(limit: int, in_use: int) -> int:
    """Descriptors to keep free under an open-file ``limit`` with ``in_use`` already
    open: those in use, plus an eighth of the limit (at least MIN_DESCRIPTOR_RESERVE)."""
    return in_use + max(MIN_DESCRIPTOR_RESERVE, limit // 8)


def connection_cap(limit: int, in_use: int) -> int:
    """The most connections to keep open under an open-file ``limit``."""
    return max(0, limit - descriptor_reserve(limit, in_use))


def open_descriptors() -> int:
    """How many file descriptors this process has open (0 where it cannot tell)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


class ConnectionGuard:
    """The connections of one server: which may be closed to make room, and who may
    read a body. ``connection`` is any hashable handle (the protocol object)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self._waiting: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self._open: set[Hashable] = set()
        self._body_readers: set[Hashable] = set()
        # Why connections were closed or requests refused by the guard (for /metrics).
        self.closed_by_reason: Counter[str] = Counter()
        self.on_close_reason: Callable[[str], None] = lambda reason: None
        # Whether a request (its ASGI scope, headers only) will be refused at once, so
        # that its body need not be read first (a full model queue: see app.py).
        self.refuses_at_once: Callable[[dict], bool] = lambda scope: False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def body_readers(self) -> int:
        return len(self._body_readers)

    def count(self, reason: str) -> None:
        self.closed_by_reason[reason] += 1
        self.on_close_reason(reason)

    def opened(self, connection: Hashable) -> Optional[Hashable]:
        """A new connection; returns the connection to close to stay under the cap
        (the one waiting longest, or the new one when none is waiting), or None."""
        self._open.add(connection)
        self._waiting[connection] = None
        cap = self.limits.max_connections
        if cap is None or len(self._open) <= cap:
            return None
        victim = next(iter(self._waiting))
        self.count("evicted" if victim is not connection else "over_limit")
        self.closed(victim)  # counted out now: its descriptor is freed on the next turn
        return victim

    def closed(self, connection: Hashable) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)
        self._body_readers.discard(connection)

    def headers_complete(self, connection: Hashable) -> None:
        """The connection's request belongs to the server now: no longer a victim."""
        self._waiting.pop(connection, None)

    def answered(self, connection: Hashable) -> None:
        """The connection's last answer is out; it waits for its next request, and is
        the youngest of the waiting ones (first bytes of a request do not rejuvenate it)."""
        if connection in self._open:
            self._waiting.pop(connection, None)
            self._waiting[connection] = None

    def start_body(self, connection: Hashable) -> bool:
        """A place to read a body that is still arriving; False when all are taken."""
        if connection in self._body_readers:
            return True
        if len(self._body_readers) >= self.limits.max_body_readers:
            return False
        self._body_readers.add(connection)
        return True

    def end_body(self, connection: Hashable) -> None:
        self._body_readers.discard(connection)

    def report(self) -> dict:
        """/info's view: the limits and what the guard holds and has done."""
        limits = self.limits
        return {
            "open": self.open_connections,
            "max": limits.max_connections,
            "bodies_reading": self.body_readers,
            "max_body_readers": limits.max_body_readers,
            "idle_timeout_s": limits.idle_timeout_s,
            "header_timeout_s": limits.header_timeout_s,
            "body_timeout_s": limits.body_timeout_s,
            "body_min_rate": limits.body_min_rate,
            "closed_by_reason": dict(sorted(self.closed_by_reason.items())),
        }
