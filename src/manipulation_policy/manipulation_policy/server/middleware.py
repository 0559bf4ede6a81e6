"""The server's ASGI middleware: request metrics, and admission to /infer before its
body is read (with a paced refusal for clients that ignore Retry-After)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Optional

from manipulation_policy.server.auth import OPEN_PATHS
from manipulation_policy.server.connection_guard import BODY_UNREAD
from manipulation_policy.server.http_body import drain_before_close
from manipulation_policy.server.inference_worker import (
    BackendStuckError,
    InferenceWorker,
    QueueFullError,
)
from manipulation_policy.server.metrics import ServerMetrics

KNOWN_ENDPOINTS = frozenset({"/health", "/infer", "/info", "/metrics"}) | OPEN_PATHS
# A connection refused again within this time waits out the rest of it (RefusalPacer).
REFUSAL_COOLDOWN_S = 0.5


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it (outermost layer)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        endpoint = scope["path"] if scope["path"] in KNOWN_ENDPOINTS else "other"

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self._metrics.observe_request(
                endpoint, scope["method"], status, time.perf_counter() - started
            )


class RefusalPacer:
    """How long a connection must wait before its next refusal.

    A client that ignores Retry-After sends its next request the moment its 503
    arrives; a few dozen such clients keep the event loop answering 503s, and the
    admitted requests wait for the loop. So a connection refused less than
    ``cooldown_s`` ago is answered only when that time is up (and admitted if a
    place freed meanwhile). A first refusal, or one after the cooldown, is at once.
    """

    def __init__(
        self,
        cooldown_s: float = REFUSAL_COOLDOWN_S,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cooldown_s = cooldown_s
        self._max_clients = max_clients
        self._clock = clock
        self._last_refused: OrderedDict[Any, float] = OrderedDict()

    def delay_for(self, client: Any) -> float:
        last = self._last_refused.get(client)
        if client is None or last is None:
            return 0.0
        return max(0.0, last + self.cooldown_s - self._clock())

    def refused(self, client: Any) -> None:
        if client is None:
            return
        self._last_refused[client] = self._clock()
        self._last_refused.move_to_end(client)
        while len(self._last_refused) > self._max_clients:
            self._last_refused.popitem(last=False)


def is_infer(scope) -> bool:
    return scope["type"] == "http" and scope["path"] == "/infer" and scope["method"] == "POST"


def refuses_at_once(scope, worker: InferenceWorker, pacer: RefusalPacer) -> bool:
    """Whether a request with these headers would be refused now, without the pacer's
    wait: /infer while the queue is full or the backend stuck."""
    if not is_infer(scope) or worker.refusal() is None:
        return False
    client = tuple(scope["client"]) if scope.get("client") else None
    return pacer.delay_for(client) == 0


class AdmissionMiddleware:
    """Admits POST /infer once its body is in (http_protocol.py buffers it first), and
    before it is parsed: when the queue is full or the backend is stuck, the 503 costs
    the server no parsing or decoding. A request handed over with its body unread
    (``refuses_at_once`` said it would be refused) is never admitted."""

    def __init__(
        self,
        app,
        worker: InferenceWorker,
        refuse: Callable[[Exception], Any],
        pacer: Optional[RefusalPacer] = None,
    ):
        self.app = app
        self._worker = worker
        self._refuse = refuse  # (exception) -> an ASGI app that sends the 503
        self._pacer = pacer or RefusalPacer()

    def _admit(self, scope) -> Optional[Exception]:
        if scope.get(BODY_UNREAD):
            return self._worker.refusal() or QueueFullError("no place was free at its headers")
        try:
            self._worker.try_admit()
        except (QueueFullError, BackendStuckError) as exc:
            return exc
        return None

    async def __call__(self, scope, receive, send):
        if not is_infer(scope):
            await self.app(scope, receive, send)
            return
        refusal = self._admit(scope)
        if refusal is not None:
            client = tuple(scope["client"]) if scope.get("client") else None
            delay = self._pacer.delay_for(client)
            if delay > 0:
                await asyncio.sleep(delay)
                refusal = self._admit(scope)
            if refusal is not None:
                self._pacer.refused(client)
                await drain_before_close(scope, receive)
                await self._refuse(refusal)(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            self._worker.release()
