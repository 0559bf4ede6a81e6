"""uvicorn's httptools protocol with the connection guard's deadlines and cap.

What it changes, per connection (the bookkeeping is ``connection_guard.py``):

- One deadline at a time: idle (from opening, or from the last answer, to the next
  request's first byte), headers (first byte to headers complete: 408), body (headers
  complete to the last body byte: 408). None is reset by bytes that trickle in.
- The body is buffered here, as a proxy would, before the application sees the
  request: admission to the model happens only with the whole body in (a request
  the application will refuse at once, /infer while the queue is full, is handed
  over unread). A body still arriving BODY_GRACE_S after its headers, or past
  BODY_GRACE_BYTES, needs one of the guard's reader places; with none free the
  answer is 503 with Retry-After at once, and the connection lingers, dropping
  input, until its idle deadline.
- Headers past MAX_HEADER_BYTES: 431.
- Past the connection cap, the connection waiting longest is closed.
- A request followed by bytes that are not HTTP gets its own answer before the 400
  that closes the connection (uvicorn would answer 400 at once and lose it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from manipulation_policy.server.connection_guard import BODY_UNREAD, ConnectionGuard

INVALID_REQUEST = "Invalid HTTP request received."
# A body complete this soon after its headers, and before this many bytes of it are
# buffered, needs no reader place: a robot's observation (a 224x224 to 640x480 JPEG,
# 16-150 KiB) never waits for one, clients that send the body after the headers
# (urllib3) included, and a refused slow sender cannot be back sooner than this.
# Bodies in their grace hold at most the connection cap times BODY_GRACE_BYTES.
BODY_GRACE_S = 1.0
BODY_GRACE_BYTES = 256 * 1024
# Request line plus headers (counted a read at a time: each read that leaves them
# incomplete); past it 431. httptools itself sets no bound.
MAX_HEADER_BYTES = 64 * 1024


def guarded_protocol(guard: ConnectionGuard, retry_after_s: int) -> type:
    """The protocol class to give uvicorn (``Config(http=...)``) for this guard."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"guard": guard, "retry_after_s": retry_after_s},
    )


def error_answer(
    status: int, kind: str, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A complete HTTP/1.1 error answer in the server's JSON error format, closing."""
    body = json.dumps({"error": kind, "field": None, "detail": detail}).encode()
    lines = [STATUS_LINE[status]]
    for name, value in (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *headers,
    ):
        lines += [name, b": ", value, b"\r\n"]
    return b"".join([*lines, b"\r\n", body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    guard: ConnectionGuard
    retry_after_s: int = 1

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Optional[asyncio.TimerHandle] = None
        self._buffering: Optional[tuple[Any, Any]] = None  # (cycle, app) awaiting its body
        self._reading_body = False  # holds one of the guard's reader places
        self._grace: Optional[asyncio.TimerHandle] = None
        self._deferred_error: Optional[str] = None
        self._discarding = False  # answered and closing: input is dropped
        self._in_headers = False
        self._header_bytes = 0
        victim = self.guard.opened(self)
        if victim is not None:
            victim.transport.close()
            if victim is self:
                return
        self._arm(self.guard.limits.idle_timeout_s, self._idle_expired)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        self._end_buffering()
        self.guard.closed(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._buffering is not None:
            self.transport.close()  # a body still arriving has no answer to wait for
            return
        super().shutdown()

    # --- deadlines -------------------------------------------------------------------

    def _arm(self, seconds: float, expired) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _idle_expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.guard.count("idle_timeout")
            self.transport.close()

    def _headers_expired(self) -> None:
        self._deadline = None
        self.guard.count("header_timeout")
        if self._in_flight():
            self.cycle.keep_alive = False  # answer what is in flight, then close
            return
        self._refuse(408, "header_timeout", "the request headers did not arrive in time")

    def _body_expired(self) -> None:
        self._deadline = None
        if self._buffering is None:
            return
        self.guard.count("body_timeout")
        self._refuse(
            408,
            "body_timeout",
            f"the request body did not arrive within {self.guard.limits.body_timeout_s:g} s",
        )

    def _refuse(self, status: int, kind: str, detail: str, headers=(), linger=False) -> None:
        """Answer an error and close; with ``linger``, close only at the idle deadline
        (or when the client does), dropping what it sends meanwhile. A refused client
        that ignores the answer then cannot come back at once on a new connection,
        and the lingering connection is the first to go when connections run short."""
        if self._buffering is not None:
            cycle = self._buffering[0]
            cycle.response_complete = True  # uvicorn drops what follows
            cycle.body = bytearray()
        self._end_buffering()
        if self.transport.is_closing():
            return
        self.transport.write(error_answer(status, kind, detail, headers))
        if not linger:
            self.transport.close()
            return
        self._discarding = True
        self.guard.answered(self)
        self._arm(self.guard.limits.idle_timeout_s, self._idle_expired)

    # --- parsing ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._deferred_error is not None or self._discarding:
            return  # the connection closes once the answers in flight are out
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning(INVALID_REQUEST)
            if self._in_flight():
                # Reading goes on (and drops what comes): a socket closed with unread
                # input is reset, and the client could lose the answers before the 400.
                self._deferred_error = INVALID_REQUEST
                self._disarm()
            else:
                self.send_400_response(INVALID_REQUEST)
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        if self._in_headers:
            self._header_bytes += len(data)
        if self._in_headers and self._header_bytes > MAX_HEADER_BYTES:
            self.guard.count("headers_too_large")
            detail = f"the request line and headers exceed {MAX_HEADER_BYTES} bytes"
            self._refuse(431, "headers_too_large", detail)
            return
        self._after_feed()

    def _after_feed(self) -> None:
        if self._buffering is None or self._reading_body:
            return
        cycle = self._buffering[0]
        # With 100-continue the client sends nothing before its 100 Continue.
        if cycle.waiting_for_100_continue or len(cycle.body) > BODY_GRACE_BYTES:
            self._claim_reader()
        elif self._grace is None:
            self._grace = self.loop.call_later(BODY_GRACE_S, self._claim_reader)

    def _claim_reader(self) -> None:
        """A body still arriving after its grace needs a reader place."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._buffering is None or self._reading_body or self.transport.is_closing():
            return
        if not self.guard.start_body(self):
            self.guard.count("body_readers_full")
            self._refuse(
                503,
                "too_many_bodies",
                "too many request bodies are arriving at once; retry later",
                ((b"retry-after", str(self.retry_after_s).encode()),),
                linger=True,
            )
            return
        self._reading_body = True
        if self.guard.limits.body_min_rate > 0:
            self._grace = self.loop.call_later(1.0, self._check_rate)
        cycle = self._buffering[0]
        if cycle.waiting_for_100_continue:
            cycle.waiting_for_100_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _check_rate(self) -> None:
        """A body holding a reader place below --body-min-rate on average: 408."""
        self._grace = None
        if self._buffering is None or self.transport.is_closing():
            return
        cycle = self._buffering[0]
        rate = len(cycle.body) / max(self.loop.time() - self._body_since, 1e-3)
        minimum = self.guard.limits.body_min_rate
        if rate >= minimum:
            self._grace = self.loop.call_later(1.0, self._check_rate)
            return
        self.guard.count("body_too_slow")
        detail = f"the request body arrives at {rate:.0f} bytes/s, under {minimum:g}"
        self._refuse(408, "body_too_slow", detail)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        if not self._in_flight():
            self._arm(self.guard.limits.header_timeout_s, self._headers_expired)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        self.guard.headers_complete(self)
        super().on_headers_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        # Called by uvicorn at headers complete (or for a pipelined request whose turn
        # came): hold the request until its body is in.
        if cycle is not self.cycle or not cycle.more_body or self._declared_too_large():
            super()._start_asgi_task(cycle, app)
            return
        if self.guard.refuses_at_once(cycle.scope):
            cycle.scope[BODY_UNREAD] = True
            super()._start_asgi_task(cycle, app)
            return
        self._buffering = (cycle, app)
        self._body_since = self.loop.time()
        self._arm(self.guard.limits.body_timeout_s, self._body_expired)

    def _declared_too_large(self) -> bool:
        # The application refuses it (413) without the body; buffering it would be waste.
        for name, value in self.headers:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.guard.limits.max_buffered_body_bytes
        return False

    def on_body(self, body: bytes) -> None:
        if self._buffering is None or self._buffering[0] is not self.cycle:
            super().on_body(body)
            return
        cycle = self.cycle
        cycle.body += body  # no flow-control pause: the body is wanted whole
        if len(cycle.body) > self.guard.limits.max_buffered_body_bytes:
            self._release()  # the application streams the rest and answers 413

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._buffering is not None and self._buffering[0] is self.cycle:
            self._release()

    def _release(self) -> None:
        cycle, app = self._buffering
        self._end_buffering()
        self._disarm()
        cycle.message_event.set()
        super()._start_asgi_task(cycle, app)

    def _end_buffering(self) -> None:
        self._buffering = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._reading_body:
            self._reading_body = False
            self.guard.end_body(self)

    def _in_flight(self) -> bool:
        """A request of this connection is being served or waits its turn."""
        return bool(self.pipeline) or (
            self.cycle is not None and not self.cycle.response_complete and self._buffering is None
        )

    # --- answers ---------------------------------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._in_flight() or self._buffering is not None:
            return
        if self._deferred_error is not None:
            self.send_400_response(self._deferred_error)
            return
        self.guard.answered(self)
        self._unset_keepalive_if_required()  # the deadline below replaces it
        if self._in_headers:  # the next request began while this one was served
            self._arm(self.guard.limits.header_timeout_s, self._headers_expired)
        else:
            self._arm(self.guard.limits.idle_timeout_s, self._idle_expired)
