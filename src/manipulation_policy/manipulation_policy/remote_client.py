"""HTTP client of the policy server: bounded retries and a circuit breaker. No ROS.

One ``RemoteClient.infer(body)`` call posts a contract request to
``<url>/infer`` on a kept-alive session and returns a ``RemoteResult``: the
decoded PolicyAction, or the reason there is none. It never raises for
network or server trouble, and its duration is bounded by
``(1 + retry_attempts)`` attempts of ``timeout_sec`` each plus short backoffs.

The circuit breaker stops hammering a server that is down: after
``failure_threshold`` consecutive failed calls it opens, and calls fail at
once without touching the network. After a cooldown one call goes through
as a probe (half-open, a single attempt): success closes the breaker, failure
opens it again with a doubled cooldown (capped). So the client backs off while
the server is down and recovers by itself once it is back.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional

import requests

from .contract import parse_response, response_to_action
from .errors import InputError
from .openvla_actions import ActionConversionOptions
from .policy_types import PolicyAction
from .upstream_compat import canonical_answer

# Statuses worth another attempt: the server is overloaded, restarting or broken for now.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    timeout_sec: float = 1.0
    retry_attempts: int = 3
    api_key: str = ""
    backoff_initial_sec: float = 0.05
    backoff_max_sec: float = 0.5
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


@dataclass(frozen=True)
class RemoteResult:
    action: Optional[PolicyAction] = None
    failure: Optional[str] = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.action is not None


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with an exponentially growing cooldown. Thread-safe."""

    def __init__(
        self,
        failure_threshold: int = 2,
        cooldown_sec: float = 0.5,
        max_cooldown_sec: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._initial_cooldown = cooldown_sec
        self._max_cooldown = max_cooldown_sec
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown_sec
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self._cooldown - self._clock())

    def try_acquire(self) -> Optional[BreakerState]:
        """May a call go out? Returns the state it goes out in (HALF_OPEN = probe), or None."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return BreakerState.CLOSED
            if self._state is BreakerState.OPEN and (
                self._clock() >= self._opened_at + self._cooldown
            ):
                self._state = BreakerState.HALF_OPEN
                return BreakerState.HALF_OPEN
            return None  # open and cooling down, or a probe is already out

    def record_success(self) -> None:
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._cooldown = self._initial_cooldown

    def record_failure(self) -> None:
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._cooldown = min(self._max_cooldown, self._cooldown * 2)
                self._open()
                return
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()

    def reset(self) -> None:
        self.record_success()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()


@dataclass(frozen=True)
class _Attempt:
    action: Optional[PolicyAction] = None
    failure: Optional[str] = None
    retryable: bool = False  # the server was unreachable or failing, not refusing us
    reached_server: bool = False


class RemoteClient:
    def __init__(
        self,
        settings: RemoteSettings,
        breaker: Optional[CircuitBreaker] = None,
        session: Optional[requests.Session] = None,
    ):
        self._settings = settings
        self._settings_lock = threading.Lock()
        self.breaker = breaker or CircuitBreaker()
        self._session = session or requests.Session()
        self._closed = threading.Event()

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
        if url_changed:
            self.breaker.reset()

    def close(self) -> None:
        """Stop: pending backoffs end at once, later calls fail, the session is closed."""
        self._closed.set()
        self._session.close()

    def infer(self, body: dict) -> RemoteResult:
        settings = self.settings
        if self._closed.is_set():
            return RemoteResult(failure="client closed")
        state = self.breaker.try_acquire()
        if state is None:
            wait = self.breaker.seconds_until_probe()
            return RemoteResult(
                failure=f"server unreachable (circuit open; next probe in {wait:.1f} s)"
            )
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        # A probe is a single attempt: one request to learn whether the server is back.
        attempts = 1 if state is BreakerState.HALF_OPEN else settings.max_attempts
        failure = "no attempt made"
        for attempt in range(attempts):
            if attempt and self._closed.wait(settings.backoff_before(attempt)):
                return RemoteResult(failure="client closed", attempts=attempt)
            outcome = self._post_once(settings, payload)
            if outcome.reached_server:
                self.breaker.record_success()
            if outcome.action is not None:
                return RemoteResult(action=outcome.action, attempts=attempt + 1)
            failure = outcome.failure or "unknown failure"
            if not outcome.retryable:
                return RemoteResult(failure=failure, attempts=attempt + 1)
        self.breaker.record_failure()
        if state is BreakerState.HALF_OPEN:
            return RemoteResult(failure=f"{failure} (probe while the server is down)", attempts=1)
        return RemoteResult(failure=f"{failure} (after {attempts} attempts)", attempts=attempts)

    def _post_once(self, settings: RemoteSettings, payload: bytes) -> _Attempt:
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        try:
            response = self._session.post(
                settings.infer_url, data=payload, headers=headers, timeout=settings.timeout_sec
            )
        except requests.Timeout:
            return _Attempt(failure=f"timed out after {settings.timeout_sec:g} s", retryable=True)
        except requests.RequestException as exc:
            return _Attempt(failure=f"cannot reach {settings.infer_url}: {_short(exc)}",
                            retryable=True)

        status = response.status_code
        if status == 200:
            try:
                answer = canonical_answer(response.json(), settings.raw_action_options)
                action = response_to_action(parse_response(answer))
            except (ValueError, InputError) as exc:
                return _Attempt(failure=f"invalid response from server: {exc}",
                                reached_server=True)
            return _Attempt(action=action, reached_server=True)
        detail = _error_detail(response)
        if status in RETRYABLE_STATUSES:
            return _Attempt(failure=f"server error {status}: {detail}", retryable=True)
        if status in (401, 403):
            return _Attempt(failure=f"refused with {status} (check remote_api_key): {detail}",
                            reached_server=True)
        return _Attempt(failure=f"request refused with {status}: {detail}", reached_server=True)


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _short(response.text or response.reason or "")
    if isinstance(body, dict):
        field, detail = body.get("field"), body.get("detail") or body.get("error")
        if field and detail:
            return f"{field}: {detail}"
        if detail:
            return _short(str(detail))
    return _short(json.dumps(body))


def _short(value: Any, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
