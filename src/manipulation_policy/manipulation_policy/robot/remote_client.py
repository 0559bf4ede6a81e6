"""HTTP client of the policy server: deadlines, bounded retries, a circuit breaker. No ROS.

One ``RemoteClient.infer(body)`` call posts a contract request to
``<url>/infer`` and returns a ``RemoteResult``: the validated action chunk
(``result.chunk``; ``result.action`` is its first action), or the reason
there is none. It never raises, whatever the server sends.

Time: each attempt (connect, send, receive, decode) ends by a deadline of
``timeout_sec`` after it starts, however slowly the server trickles its
answer; redirects are not followed; the answer is capped at
``max_response_bytes`` before and after content decoding. So one call lasts
at most ``(1 + retry_attempts) * timeout_sec`` plus the backoffs between
attempts (``RemoteSettings.worst_case_sec``).

Trust: an answer becomes an action only after ``response_validation``
accepted it for this request; any answer that is not a valid action is a
failed call, like an unreachable server.

Request ids: every call sends a ``request_id`` (the body's own, else a fresh
one: a random prefix per client and a counter), the same for all attempts of
the call, which carry the same observation: an answer to any of them answers
this observation, and the caller (the executor) knows the call by one id. An
answer naming another id is refused (``ForeignAnswer``) and its connection
closed, and the attempt may be retried on a fresh one. That a late answer to
an earlier call cannot be taken for this one's does not rest on the id alone
(upstream's server echoes none): ``http_exchange`` closes the connection of
every exchange that did not end with a whole answer read (a timeout above
all), so a late answer can only reach a closed socket, and it reuses a
connection only when it is idle with nothing to read.

Concurrency: ``infer`` may be called from several threads at once (the remote
node's ``remote_max_in_flight``). Each call takes its own connection from a small
pool (``HttpPoster``s, one caller each): idle ones are reused, at most
``max_in_flight`` are kept, and one more caller than that gets a fresh connection
closed after its call. So every guarantee above holds per connection: no answer
read on one connection can belong to a call made on another.

The circuit breaker stops hammering a server that fails: after
``failure_threshold`` consecutive failed calls it opens, and calls fail at
once without touching the network. After a cooldown one call goes through
as a probe (half-open, a single attempt): success closes the breaker, failure
opens it again with a doubled cooldown (capped). A 503 or 429 with
``Retry-After`` longer than the next backoff ends the call and keeps the
breaker open for that long (at most ``retry_after_max_sec``).
"""

from __future__ import annotations

import enum
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, Optional

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_types import ActionChunk, PolicyAction
from manipulation_policy.core.upstream_compat import ActionConversionOptions, canonical_answer
from manipulation_policy.robot.http_exchange import (
    AnswerRefused,
    DeadlineExceeded,
    ExchangeError,
    HttpAnswer,
    HttpPoster,
    error_text,
)
from manipulation_policy.robot.response_validation import (
    Expectation,
    ForeignAnswer,
    is_chunk_answer,
    validate_chunk,
)

# Statuses worth another attempt: the server is overloaded, restarting or broken for now.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    timeout_sec: float = 1.0
    retry_attempts: int = 3
    api_key: str = ""
    backoff_initial_sec: float = 0.05
    backoff_max_sec: float = 0.5
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    retry_after_max_sec: float = 30.0
    # Calls made at once (remote_max_in_flight): connections kept alive for them.
    max_in_flight: int = 1
    # How a raw OpenVLA action vector in an upstream-shaped answer is converted.
    raw_action_options: Optional[ActionConversionOptions] = None

    @property
    def infer_url(self) -> str:
        return self.url.rstrip("/") + "/infer"

    @property
    def max_attempts(self) -> int:
        return 1 + max(0, self.retry_attempts)

    def backoff_before(self, attempt: int) -> float:
        """Pause before attempt number ``attempt`` (1 = the first retry)."""
        return min(self.backoff_max_sec, self.backoff_initial_sec * 2 ** (attempt - 1))

    @property
    def worst_case_sec(self) -> float:
        """The longest one infer() call can take, whatever the server does."""
        backoffs = sum(self.backoff_before(n) for n in range(1, self.max_attempts))
        return self.max_attempts * self.timeout_sec + backoffs


@dataclass(frozen=True)
class RemoteResult:
    chunk: Optional[ActionChunk] = None
    failure: Optional[str] = None
    attempts: int = 0
    request_id: Optional[str] = None  # the id the call sent (None: it sent nothing)

    @property
    def ok(self) -> bool:
        return self.chunk is not None

    @property
    def action(self) -> Optional[PolicyAction]:
        """The chunk's first action (a single-step server's whole answer)."""
        return self.chunk.actions[0] if self.chunk is not None else None


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BreakerListener = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """Consecutive-failure breaker with an exponentially growing cooldown. Thread-safe.

    ``on_change(old, new)`` is called after every state change, outside the lock.
    """

    def __init__(
        self,
        failure_threshold: int = 2,
        cooldown_sec: float = 0.5,
        max_cooldown_sec: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Optional[BreakerListener] = None,
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._initial_cooldown = cooldown_sec
        self._max_cooldown = max_cooldown_sec
        self._clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown_sec
        self._probe_at = 0.0  # while open: when the next probe may go

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._probe_at - self._clock())

    def try_acquire(self) -> Optional[BreakerState]:
        """May a call go out? Returns the state it goes out in (HALF_OPEN = probe), or None."""
        with self._lock:
            old = self._state
            if old is BreakerState.CLOSED:
                return BreakerState.CLOSED
            if old is BreakerState.OPEN and self._clock() >= self._probe_at:
                self._state = BreakerState.HALF_OPEN
            else:
                return None  # open and cooling down, or a probe is already out
        self._notify(old, BreakerState.HALF_OPEN)
        return BreakerState.HALF_OPEN

    def record_success(self) -> None:
        with self._lock:
            old = self._state
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._cooldown = self._initial_cooldown
        self._notify(old, BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            old = self._state
            if old is BreakerState.HALF_OPEN:
                self._cooldown = min(self._max_cooldown, self._cooldown * 2)
                self._open()
            else:
                self._failures += 1
                if self._failures >= self._threshold:
                    self._open()
            new = self._state
        self._notify(old, new)

    def hold_off(self, seconds: float) -> None:
        """The server asked for ``seconds`` of quiet (Retry-After): open, probe after that."""
        with self._lock:
            old = self._state
            later = self._probe_at if old is BreakerState.OPEN else 0.0
            self._state = BreakerState.OPEN
            self._probe_at = max(later, self._clock() + seconds)
        self._notify(old, BreakerState.OPEN)

    def reset(self) -> None:
        self.record_success()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._probe_at = self._clock() + self._cooldown

    def _notify(self, old: BreakerState, new: BreakerState) -> None:
        listener = self.on_change
        if listener is not None and old is not new:
            try:
                listener(old, new)
            except Exception:  # noqa: BLE001 - a listener must not break the client
                pass


@dataclass(frozen=True)
class _Attempt:
    chunk: Optional[ActionChunk] = None
    failure: Optional[str] = None
    retryable: bool = False  # the server was unreachable or failing for now
    retry_after_sec: Optional[float] = None  # what the server asked for (capped)


class PosterPool:
    """``HttpPoster``s for calls made at once, one caller each: an idle one is reused, at
    most ``limit`` are kept (a caller beyond that gets one closed after its call, so no
    caller ever waits for another's connection). Thread-safe; ``close`` closes all,
    in use or not (their exchanges end at once)."""

    def __init__(self, limit: int = 1, first: Optional[HttpPoster] = None):
        self._lock = threading.Lock()
        self._limit = max(1, limit)
        self._idle: list[HttpPoster] = [first] if first is not None else []
        self._in_use: list[HttpPoster] = []
        self._closed = False

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = max(1, limit)
            extra = self._idle[max(0, self._limit - len(self._in_use)):]
            del self._idle[len(self._idle) - len(extra):]
        for poster in extra:
            poster.close()

    def acquire(self) -> HttpPoster:
        with self._lock:
            poster = self._idle.pop() if self._idle else HttpPoster()
            self._in_use.append(poster)
            closed = self._closed
        if closed:
            poster.close()  # its exchange fails at once: "client closed"
        return poster

    def release(self, poster: HttpPoster) -> None:
        with self._lock:
            self._in_use.remove(poster)
            keep = not self._closed and len(self._idle) + len(self._in_use) < self._limit
            if keep:
                self._idle.append(poster)
        if not keep:
            poster.close()

    def size(self) -> int:
        """Connections' posters kept or in use."""
        with self._lock:
            return len(self._idle) + len(self._in_use)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            posters = self._idle + self._in_use
            self._idle = []
        for poster in posters:
            poster.close()


class RemoteClient:
    def __init__(
        self,
        settings: RemoteSettings,
        breaker: Optional[CircuitBreaker] = None,
        poster: Optional[HttpPoster] = None,
    ):
        self._settings = settings
        self._settings_lock = threading.Lock()
        self.breaker = breaker or CircuitBreaker()
        # ``poster``: the first connection's (tests); more are made for concurrent calls.
        self.posters = PosterPool(settings.max_in_flight, poster)
        self._closed = threading.Event()
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count(1)
        self._id_lock = threading.Lock()

    @property
    def settings(self) -> RemoteSettings:
        with self._settings_lock:
            return self._settings

    def update(self, **changes: Any) -> None:
        """Change settings for the next call; a new URL is a new server, so the breaker resets."""
        with self._settings_lock:
            old = self._settings
            self._settings = replace(old, **changes)
            url_changed = self._settings.url != old.url
            limit = self._settings.max_in_flight
        self.posters.set_limit(limit)
        if url_changed:
            self.breaker.reset()

    def new_request_id(self) -> str:
        """An id no other call of this client (nor, but by a 2**-64 chance, of another
        client) has sent: for a caller that needs it before the call."""
        with self._id_lock:
            number = next(self._id_counter)
        return f"{self._id_prefix}-{number}"

    def close(self) -> None:
        """Stop: pending backoffs and exchanges end at once, later calls fail."""
        self._closed.set()
        self.posters.close()

    def infer(self, body: dict) -> RemoteResult:
        """Safe to call from several threads at once: each call has its own connection."""
        try:
            poster = self.posters.acquire()
        except Exception as exc:  # noqa: BLE001 - the promise: infer never raises
            return RemoteResult(failure=f"client error: {printable(error_text(exc))}")
        try:
            return self._infer(body, poster)
        except Exception as exc:  # noqa: BLE001 - the promise: infer never raises
            return RemoteResult(failure=f"client error: {printable(error_text(exc))}")
        finally:
            self.posters.release(poster)

    def _infer(self, body: dict, poster: HttpPoster) -> RemoteResult:
        settings = self.settings
        if self._closed.is_set():
            return RemoteResult(failure="client closed")
        state = self.breaker.try_acquire()
        if state is None:
            wait = self.breaker.seconds_until_probe()
            return RemoteResult(
                failure=f"server unreachable (circuit open; next probe in {wait:.1f} s)"
            )
        if body.get("request_id") is None:
            body = {**body, "request_id": self.new_request_id()}
        request_id = body["request_id"] if isinstance(body["request_id"], str) else None
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        expect = Expectation.of_request(body)
        # A probe is a single attempt: one request to learn whether the server is back.
        attempts = 1 if state is BreakerState.HALF_OPEN else settings.max_attempts
        failure = "no attempt made"
        for attempt in range(attempts):
            if attempt and self._closed.wait(settings.backoff_before(attempt)):
                self.breaker.record_failure()
                return RemoteResult(failure="client closed", attempts=attempt,
                                    request_id=request_id)
            outcome = self._attempt(poster, settings, payload, expect)
            if outcome.chunk is not None:
                self.breaker.record_success()
                return RemoteResult(chunk=outcome.chunk, attempts=attempt + 1,
                                    request_id=request_id)
            failure = outcome.failure or "unknown failure"
            wait = outcome.retry_after_sec
            if wait is not None and (attempt + 1 >= attempts
                                     or wait > settings.backoff_before(attempt + 1)):
                # Longer than the next backoff: no request before then, from any call.
                self.breaker.hold_off(wait)
                return RemoteResult(
                    failure=f"{failure}; the server asked to wait {wait:g} s (Retry-After)",
                    attempts=attempt + 1,
                    request_id=request_id,
                )
            if not outcome.retryable:
                self.breaker.record_failure()
                return RemoteResult(failure=failure, attempts=attempt + 1, request_id=request_id)
        self.breaker.record_failure()
        if state is BreakerState.HALF_OPEN:
            return RemoteResult(failure=f"{failure} (probe while the server is down)",
                                attempts=1, request_id=request_id)
        return RemoteResult(failure=f"{failure} (after {attempts} attempts)",
                            attempts=attempts, request_id=request_id)

    def _attempt(
        self, poster: HttpPoster, settings: RemoteSettings, payload: bytes, expect: Expectation
    ) -> _Attempt:
        started = time.monotonic()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, identity",
        }
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        try:
            answer = poster.post(
                settings.infer_url, payload, headers, settings.timeout_sec,
                settings.max_response_bytes,
            )
        except DeadlineExceeded:
            return _Attempt(failure=f"timed out after {settings.timeout_sec:g} s", retryable=True)
        except AnswerRefused as exc:
            return _Attempt(failure=f"invalid response from server: {printable(exc)}")
        except ExchangeError as exc:
            return _Attempt(
                failure=f"cannot reach {settings.infer_url}: {printable(exc)}",
                retryable=exc.retryable,
            )
        if answer.status == 200:
            try:
                chunk = decode_answer(answer.body, expect, settings.raw_action_options)
            except ForeignAnswer as exc:
                # This connection carried another request's answer: its stream may hold
                # more of them, so it is not used again. Another attempt goes out fresh.
                poster.drop_connection()
                return _Attempt(failure=f"invalid response from server: {printable(exc)}",
                                retryable=True)
            except InputError as exc:
                return _Attempt(failure=f"invalid response from server: {printable(exc)}")
            if time.monotonic() - started > settings.timeout_sec:
                return _Attempt(failure=f"timed out after {settings.timeout_sec:g} s",
                                retryable=True)
            return _Attempt(chunk=chunk)
        return _refusal(answer, settings)


def decode_answer(
    raw: bytes,
    expect: Expectation,
    raw_action_options: Optional[ActionConversionOptions] = None,
) -> ActionChunk:
    """Body bytes of a 200 answer -> the validated chunk; InputError says why not.

    An answer with this contract's chunk fields is validated as it is. Any other is
    upstream-shaped: a raw OpenVLA action vector is first turned into the canonical
    fields, in the frame the robot asked for, and ``actions`` (where upstream puts
    such a vector) is not read as a chunk; the answer is then a chunk of one.
    """
    payload = parse_json_body(raw)
    if not is_chunk_answer(payload):
        payload = canonical_answer(payload, raw_action_options, expect.reference_frame)
        if isinstance(payload, dict) and "actions" in payload:
            payload = {key: value for key, value in payload.items() if key != "actions"}
    return validate_chunk(payload, expect)


def _refusal(answer: HttpAnswer, settings: RemoteSettings) -> _Attempt:
    status = answer.status
    detail = _error_detail(answer.body)
    if 300 <= status < 400:
        target = printable(answer.headers.get("location", "nowhere"), 100)
        return _Attempt(failure=f"server redirects ({status}) to {target}; redirects are "
                                "not followed: point remote_url at the server itself")
    if status in RETRYABLE_STATUSES:
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = parse_retry_after(answer.headers.get("retry-after"),
                                            settings.retry_after_max_sec)
        return _Attempt(failure=f"server error {status}: {detail}", retryable=True,
                        retry_after_sec=retry_after)
    if status in (401, 403):
        return _Attempt(failure=f"refused with {status} (check the API key: "
                                f"remote_api_key_file or MANIPULATION_POLICY_API_KEY): {detail}")
    return _Attempt(failure=f"request refused with {status}: {detail}")


def parse_retry_after(value: Optional[str], cap_sec: float) -> Optional[float]:
    """Retry-After (delay seconds or an HTTP date) in seconds within [0, cap_sec]; None if
    absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(int(text[:12]))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(0.0, seconds), cap_sec)


def _error_detail(body: bytes) -> str:
    try:
        payload = parse_json_body(body)
    except InputError:
        return printable(body.decode("utf-8", "replace"))
    if isinstance(payload, dict):
        name, detail = payload.get("field"), payload.get("detail") or payload.get("error")
        if isinstance(name, str) and isinstance(detail, str):
            return printable(f"{name}: {detail}")
        if isinstance(detail, str):
            return printable(detail)
    return printable(body.decode("utf-8", "replace"))


def printable(value: Any, limit: int = 200) -> str:
    """Server-sent text made safe for a log line: escapes control characters and lone
    surrogates (which would make ROS logging raise), and is cut to ``limit``."""
    text = str(value)[: limit * 2]
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
