"""The policy server's HTTP application: routes, request handling, error mapping.

Every error is a JSON body ``{"error": kind, "field": path-or-null, "detail": text}``;
``kind`` is also the label of ``policy_server_errors_total``. Bad input is a
4xx naming the field; a 5xx means the server or the backend failed, never the
client. /infer reads its body itself (admitted before it is read, bounded while
it streams): strict JSON goes straight into the InferRequest model; a body that
orjson or the model refuses is parsed again by json_body.py, which names the
field at fault and reads NaN in joint arrays as unknown. The OpenAPI document
is generated from the contract's models.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import platform
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

try:  # a compiled JSON codec: strict RFC 8259 parsing, ~10x faster encoding
    import orjson
except ImportError:  # pragma: no cover - requirements install it; json still works
    orjson = None

from manipulation_policy import __version__
from manipulation_policy.backends import PolicyBackend, batch_predictor, predictor
from manipulation_policy.core.contract import (
    ErrorResponse,
    HealthResponse,
    InferRequest,
    InferResponse,
    field_path,
    parse_request,
    request_to_observation,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import DEFAULT_MAX_IMAGE_PIXELS
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_types import Observation, PolicyAction
from manipulation_policy.server.answer import BackendAnswerError, checked_response
from manipulation_policy.server.auth import OPEN_PATHS, BearerAuthMiddleware
from manipulation_policy.server.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE
from manipulation_policy.server.inference_worker import (
    DEFAULT_DEADLINE_S,
    BackendStuckError,
    ClientGoneError,
    InferenceWorker,
    PredictionTimeoutError,
    QueueFullError,
)
from manipulation_policy.server.log_limits import clip
from manipulation_policy.server.metrics import EXPOSITION_CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("manipulation_policy.policy_server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8
# nginx's code for "client closed the request": logged and counted, never received.
CLIENT_CLOSED_REQUEST = 499
# A window longer than this would make every robot wait for nothing.
MAX_BATCH_WINDOW_MS = 1000.0
KNOWN_ENDPOINTS = frozenset({"/health", "/infer", "/info", "/metrics"}) | OPEN_PATHS
# A body still arriving when the server answers early is read and dropped, up to these
# bounds, before a closing connection is closed (see drain_before_close).
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_SECONDS = 5.0
# A body up to this size is parsed on the event loop when its request is alone, and its
# image decoded there too when declared no larger than this (a 640x480 JPEG: ~3 ms).
INLINE_PARSE_MAX_BYTES = 128 * 1024
INLINE_DECODE_MAX_PIXELS = 640 * 480
# A connection refused again within this time waits out the rest of it (RefusalPacer).
REFUSAL_COOLDOWN_S = 0.5


@dataclass(frozen=True)
class ServerConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    api_key: Optional[str] = None
    retry_after_s: int = 1
    decode_threads: int = 2
    # Deadline of one model call: one prediction, or one batch of them.
    inference_timeout_s: float = DEFAULT_DEADLINE_S
    # Micro-batching (batching.py): at most this many observations per model call,
    # collected for at most this long while other admitted requests are on their way.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_image_pixels",
            "retry_after_s",
            "decode_threads",
            "max_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 < self.inference_timeout_s < float("inf"):
            raise ValueError(f"inference_timeout_s must be > 0, got {self.inference_timeout_s}")
        if not 0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS:
            raise ValueError(
                f"batch_window_ms must be in [0, {MAX_BATCH_WINDOW_MS:g}], "
                f"got {self.batch_window_ms}"
            )


class ApiError(Exception):
    """An error answer: HTTP status, kind (the ``error`` field), field path and detail."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        field: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.field = field
        self.headers = headers

    @classmethod
    def from_input_error(cls, status: int, kind: str, exc: InputError) -> ApiError:
        return cls(status, kind, exc.message, exc.field)


# ------------------------------------------------------------- body handling


def check_json_content_type(content_type: Optional[str]) -> None:
    """The body must be declared JSON. Refusing form, text and undeclared bodies also
    keeps a web page from posting to the server cross-site without a CORS preflight."""
    if not content_type or not content_type.strip():
        raise ApiError(
            415,
            "unsupported_media_type",
            "Content-Type is missing; send Content-Type: application/json",
            "content-type",
        )
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media_type!r} is not JSON; send Content-Type: application/json",
        "content-type",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes: from Content-Length when
    declared, while streaming otherwise (chunked bodies), so a huge body is never held."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await drain_before_close(request.scope, request.receive)
        raise _body_too_large(f"Content-Length {clip(declared, 30)} exceeds", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await drain_before_close(request.scope, request.receive, already=size)
            raise _body_too_large("the streamed body exceeds", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip().lower()
    return ""


def connection_closes_after_response(scope) -> bool:
    connection = _header(scope, b"connection")
    if scope.get("http_version") == "1.0":
        return "keep-alive" not in connection
    return "close" in connection


async def drain_before_close(scope, receive, already: int = 0) -> None:
    """Read and drop the rest of a request body the server will not use, when the
    connection closes after the answer (``Connection: close``, HTTP/1.0).

    Closing a socket with unread data makes the kernel reset the connection, and a
    client still sending (Python's urllib does) then sees "connection reset" instead
    of the 413 or 503. On a kept-alive connection uvicorn drops the rest itself; a
    client that asked ``Expect: 100-continue`` has sent nothing. Bounded in bytes and
    time: past either, the answer goes out anyway.
    """
    if not connection_closes_after_response(scope) or "100-continue" in _header(
        scope, b"expect"
    ):
        return
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > DRAIN_MAX_BYTES:
        return

    async def drain() -> None:
        size = already
        while size <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), DRAIN_MAX_SECONDS)


def _body_too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"{what} the limit of {limit} bytes", "body")


def decode_infer_body(raw: bytes, max_image_pixels: int) -> tuple[InferRequest, Observation]:
    """Body bytes to a validated request and its Observation (image decoded).

    Runs on a worker thread: JSON parsing and image decoding stay off the event loop
    (PolicyService.decode runs small ones inline, see ``decode_inline``).
    """
    request = parse_infer_body(raw)
    return request, observation_of(request, max_image_pixels)


def parse_infer_body(raw: bytes) -> InferRequest:
    """Body bytes to a validated request, or the ApiError (400/422) naming the field."""
    request = _parse_strict_json_request(raw)
    return request if request is not None else _parse_request_naming_the_field(raw)


def observation_of(request: InferRequest, max_image_pixels: int) -> Observation:
    """The request's Observation, its image decoded (422 invalid_image when unusable)."""
    try:
        return request_to_observation(request, max_image_pixels)
    except InputError as exc:
        raise ApiError.from_input_error(422, "invalid_image", exc) from None
    except Exception as exc:  # noqa: BLE001 - only the client's image is decoded here
        # A decoder error that imaging.py does not translate is still the image's fault.
        logger.warning("image decoder raised %s: %s", type(exc).__name__, exc)
        raise ApiError(
            422, "invalid_image", f"image could not be decoded ({type(exc).__name__})", "image"
        ) from None


def _parse_strict_json_request(raw: bytes) -> Optional[InferRequest]:
    """The fast path: RFC 8259 JSON (orjson refuses NaN/Infinity, numbers that overflow,
    lone surrogates, non-UTF-8 text and deep nesting) that the model accepts as it is.

    None for anything else, which ``_parse_request_naming_the_field`` then parses
    again to name the field at fault (and to read NaN in joint arrays as unknown).
    Whatever passes here passes there too, with the same values."""
    if orjson is None:
        return None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    try:
        return InferRequest.model_validate(payload)
    except (ValidationError, InputError):
        return None


def _parse_request_naming_the_field(raw: bytes) -> InferRequest:
    """The request, or the ApiError naming what is wrong with it (400 invalid_json, 422)."""
    try:
        payload = parse_json_body(raw)
    except InputError as exc:
        raise ApiError.from_input_error(400, "invalid_json", exc) from None
    try:
        return parse_request(payload)
    except InputError as exc:
        raise ApiError.from_input_error(422, "invalid_request", exc) from None


def parse_inline(body_bytes: int, queue_depth: int) -> bool:
    """Whether a body is parsed on the event loop rather than on the decode pool.

    The hop to a pool thread and back costs more than parsing a small body. Only
    when this request is the only one admitted (``queue_depth`` counts it): then no
    other request's work waits on the loop meanwhile."""
    return queue_depth <= 1 and body_bytes <= INLINE_PARSE_MAX_BYTES


def decode_inline(request: InferRequest) -> bool:
    """Whether a parsed request's image is decoded on the event loop too: no image, or
    one whose declared size (checked against the image's header before any pixel is
    decoded) is small, so that /health and /metrics wait a millisecond or two at most.
    An image of undeclared size goes to the pool: a small body can hold a JPEG of
    millions of pixels of one colour (~50 ms to decode)."""
    if request.image is None:
        return True
    if request.image_width is None or request.image_height is None:
        return False
    return request.image_width * request.image_height <= INLINE_DECODE_MAX_PIXELS


# ------------------------------------------------------------------ responses


def json_answer(body: dict[str, Any], status: int = 200) -> Response:
    """A JSON response encoded by orjson when present (~20x faster than json.dumps)."""
    if orjson is None:
        return JSONResponse(body, status_code=status)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(
    metrics: ServerMetrics,
    status: int,
    kind: str,
    detail: str,
    field: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    metrics.count_error(kind)
    # Bounded and valid Unicode whatever the client sent: details may quote its input.
    body = {
        "error": kind,
        "field": None if field is None else clip(field, 200),
        "detail": clip(detail),
    }
    return JSONResponse(body, status_code=status, headers=headers)


_KIND_BY_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _error(description: str) -> dict[str, Any]:
    """An error answer in the OpenAPI document: FastAPI writes ErrorResponse's schema."""
    return {"model": ErrorResponse, "description": description}


# The answers of POST /infer; their schemas come from the models (contract.py).
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The policy's answer, every PolicyOutput field present."},
    400: _error("The body is not valid JSON (NaN/Infinity included); names the field."),
    401: _error("Missing or wrong bearer token (only when an API key is set)."),
    413: _error("The body exceeds the server's size limit."),
    415: _error("Content-Type is not JSON."),
    422: _error("A field has the wrong type or value, or the image is unusable."),
    500: _error("The backend failed or its answer broke the contract (not the client's fault)."),
    503: {
        **_error(
            "Too many requests waiting for the model, or a prediction is stuck past its "
            "deadline; retry after Retry-After s."
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    504: _error("The prediction did not finish within the server's deadline."),
}


# ---------------------------------------------------------------- middleware


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


class AdmissionMiddleware:
    """Admits POST /infer before its body is read: when the queue is full or the backend
    is stuck, the 503 costs the server no body parsing, decoding or buffering."""

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

    def _admit(self) -> Optional[Exception]:
        try:
            self._worker.try_admit()
        except (QueueFullError, BackendStuckError) as exc:
            return exc
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/infer" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self._admit()
        if refusal is not None:
            client = tuple(scope["client"]) if scope.get("client") else None
            delay = self._pacer.delay_for(client)
            if delay > 0:
                await asyncio.sleep(delay)
                refusal = self._admit()
            if refusal is not None:
                self._pacer.refused(client)
                await drain_before_close(scope, receive)
                await self._refuse(refusal)(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            self._worker.release()


# ----------------------------------------------------------------------- app


def gpu_memory_report() -> Optional[dict[str, Any]]:
    """CUDA memory of the current device, when the backend has loaded torch with CUDA."""
    torch = sys.modules.get("torch")  # never import torch just to report on it
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        return {
            "device": torch.cuda.get_device_name(device),
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "free_bytes": int(free),
            "total_bytes": int(total),
        }
    except Exception as exc:  # noqa: BLE001 - a report must not fail the endpoint
        return {"error": f"{type(exc).__name__}: {exc}"}


def uvicorn_implementations() -> dict[str, str]:
    """uvicorn's ``loop`` and ``http`` settings: its compiled event loop (uvloop) and
    HTTP parser (httptools) when installed, else asyncio's loop and the pure-Python h11.
    The same choice as uvicorn's "auto", made explicit so that /info can tell it."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def runtime_report(loop_type: Optional[type]) -> dict[str, str]:
    """What serves the requests (/info): Python, the event loop and HTTP parser, JSON codec."""
    return {
        "python": platform.python_version(),
        "event_loop": f"{loop_type.__module__}.{loop_type.__qualname__}" if loop_type else "",
        "http_parser": uvicorn_implementations()["http"],
        "json": f"orjson {orjson.__version__}" if orjson is not None else "json",
    }


def _describe(backend: PolicyBackend) -> dict[str, Any]:
    try:
        return dict(backend.describe())
    except Exception as exc:  # noqa: BLE001
        return {"error": f"describe() failed: {type(exc).__name__}: {exc}"}


def create_app(backend: PolicyBackend, config: Optional[ServerConfig] = None) -> FastAPI:
    """The FastAPI application serving ``backend`` (already loaded)."""
    server = PolicyService(backend, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.loop_type = type(asyncio.get_running_loop())
        yield
        # uvicorn has let in-flight requests finish before it gets here.
        server.close()

    app = FastAPI(
        title="MobileManipulationCore policy server",
        version=__version__,
        description=(
            "Vision-language-action policy over HTTP. POST /infer takes the robot's "
            "observation and answers a PolicyOutput-shaped JSON. Errors are "
            '{"error", "field", "detail"}.'
        ),
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.worker = server.worker
    app.state.metrics = server.metrics
    app.state.config = server.config
    _add_routes(app, server)
    _install_error_handlers(app, server.metrics)
    _add_middleware(app, server)
    app.openapi = lambda: _openapi_document(app, auth=server.config.api_key is not None)
    return app


class PolicyService:
    """What the routes do: the worker, the decode pool and the metrics of one app."""

    def __init__(self, backend: PolicyBackend, config: ServerConfig):
        self.backend = backend
        self.config = config
        self.worker = _make_worker(backend, config)
        self.decode_pool = ThreadPoolExecutor(
            config.decode_threads, thread_name_prefix="policy-decode"
        )
        self.loop_type: Optional[type] = None  # the event loop serving the app, for /info
        description = _describe(backend)
        worker = self.worker
        self.metrics = ServerMetrics(
            queue_depth=lambda: worker.queue_depth,
            inference_busy=lambda: worker.busy,
            info_labels={
                "version": __version__,
                "backend": str(description.get("backend", getattr(backend, "name", "unknown"))),
                "model": str(description.get("model", "")),
            },
        )
        if worker.batcher is not None:
            worker.batcher.on_batch = lambda size, _s: self.metrics.batch_size.observe(size)

    def close(self) -> None:
        self.worker.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- routes ---------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        problem = self.worker.health_problem()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def infer(self, request: Request) -> Response:
        """One observation in, one policy answer out (run alone, or batched with others)."""
        # Admitted already (AdmissionMiddleware), before the body was read.
        check_json_content_type(request.headers.get("content-type"))
        raw = await read_body(request, self.config.max_body_bytes)
        parsed, observation = await self.decode(raw)
        try:
            action, seconds = await self.predict(observation, request)
        except ClientGoneError:
            self.metrics.count_error("client_disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        self.metrics.inference_seconds.observe(seconds)
        if self.worker.batcher is None:
            self.metrics.batch_size.observe(1)
        try:
            body = checked_response(
                action, request_id=parsed.request_id, inference_time_ms=round(seconds * 1e3, 3)
            )
        except BackendAnswerError as exc:
            logger.error("backend answer refused: %s", clip(str(exc), 1000))
            raise ApiError(
                500,
                "backend_error",
                f"the backend's answer breaks the response contract: {exc}",
                exc.field,
            ) from None
        return json_answer(body)

    def info(self) -> JSONResponse:
        described = _describe(self.backend)
        metrics, worker, config = self.metrics, self.worker, self.config
        return JSONResponse(
            {
                "version": __version__,
                "backend": described,
                "model": described.get("model"),
                "device": described.get("device"),
                "gpu_memory": gpu_memory_report(),
                "uptime_s": round(metrics.uptime_seconds(), 3),
                "requests_total": metrics.requests_total(),
                "errors_total": sum(metrics.errors_by_kind().values()),
                "errors_by_kind": metrics.errors_by_kind(),
                "queue": {
                    "depth": worker.queue_depth,
                    "max": worker.max_queue,
                    "inference_in_progress": worker.busy,
                },
                "batching": _batching_report(worker, self.backend, config),
                "limits": {
                    "max_body_bytes": config.max_body_bytes,
                    "max_image_pixels": config.max_image_pixels,
                    "inference_timeout_s": config.inference_timeout_s,
                },
                "health_problem": worker.health_problem(),
                "auth_required": config.api_key is not None,
                "runtime": runtime_report(self.loop_type),
            }
        )

    async def prometheus_metrics(self) -> Response:
        return Response(self.metrics.render(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})

    # --- the steps of /infer --------------------------------------------------------

    async def decode(self, raw: bytes) -> tuple[InferRequest, Observation]:
        started = time.perf_counter()
        limit = self.config.max_image_pixels
        loop = asyncio.get_running_loop()
        if not parse_inline(len(raw), self.worker.queue_depth):
            decoded = await loop.run_in_executor(self.decode_pool, decode_infer_body, raw, limit)
        else:
            request = parse_infer_body(raw)
            if decode_inline(request):
                observation = observation_of(request, limit)
            else:
                observation = await loop.run_in_executor(
                    self.decode_pool, observation_of, request, limit
                )
            decoded = request, observation
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return decoded

    async def predict(
        self, observation: Observation, request: Request
    ) -> tuple[PolicyAction, float]:
        try:
            return await self.worker.predict(observation, request.is_disconnected)
        except ClientGoneError:
            raise
        except BackendStuckError as exc:
            raise self.unavailable(exc) from None
        except PredictionTimeoutError as exc:
            logger.error("prediction timed out: %s", exc)
            raise ApiError(
                504,
                "inference_timeout",
                f"{exc}; the server reports itself unhealthy on /health until it returns",
            ) from None
        except InputError as exc:
            # The backend refused the observation (e.g. a model that needs an image).
            raise ApiError.from_input_error(422, "invalid_request", exc) from None
        except Exception as exc:  # noqa: BLE001 - a backend failure, never a crash
            logger.error(
                "backend predict() failed: %s: %s\n%s",
                type(exc).__name__,
                clip(str(exc), 1000),
                "".join(traceback.format_tb(exc.__traceback__))[-4000:],
            )
            raise ApiError(
                500, "backend_error", f"backend failed: {type(exc).__name__}: {exc}"
            ) from None

    # --- refusals made by middleware ------------------------------------------------

    def unavailable(self, exc: Exception) -> ApiError:
        if isinstance(exc, BackendStuckError):
            kind, detail = "backend_stuck", f"the backend is not answering: {exc}"
        else:
            kind, detail = "queue_full", f"the model is busy: {exc}; retry later"
        return ApiError(
            503, kind, detail, headers={"Retry-After": str(self.config.retry_after_s)}
        )

    def refuse_admission(self, exc: Exception) -> JSONResponse:
        error = self.unavailable(exc)
        return error_response(
            self.metrics, error.status, error.kind, error.detail, headers=error.headers
        )

    def unauthorized(self) -> JSONResponse:
        return error_response(
            self.metrics,
            401,
            "unauthorized",
            "missing or wrong API key; send Authorization: Bearer <key>",
            "authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _add_routes(app: FastAPI, server: PolicyService) -> None:
    app.add_api_route(
        "/health",
        server.health,
        methods=["GET"],
        response_model=HealthResponse,
        responses={
            200: {"description": "The server is up; never needs auth."},
            503: {
                "model": HealthResponse,
                "description": (
                    "Unhealthy: a prediction is stuck past its deadline; the reason says "
                    "since when."
                ),
            },
        },
    )
    app.add_api_route(
        "/infer",
        server.infer,
        methods=["POST"],
        response_model=InferResponse,
        responses=INFER_RESPONSES,
        # The body is read by the route itself (admitted first, bounded while it streams,
        # strict JSON): the document names the model it is validated against.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
                },
            }
        },
    )
    app.add_api_route(
        "/info",
        server.info,
        methods=["GET"],
        responses={200: {"description": "Backend, versions, counters."}},
    )
    app.add_api_route(
        "/metrics",
        server.prometheus_metrics,
        methods=["GET"],
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )


def _add_middleware(app: FastAPI, server: PolicyService) -> None:
    """Outermost last: metrics see every answer, auth comes before admission."""
    app.add_middleware(
        AdmissionMiddleware, worker=server.worker, refuse=server.refuse_admission
    )
    if server.config.api_key is not None:
        app.add_middleware(
            BearerAuthMiddleware, key=server.config.api_key, reject=server.unauthorized
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=server.metrics)


def batching_off_reason(backend: PolicyBackend, config: ServerConfig) -> Optional[str]:
    """Why observations are predicted one at a time, or None when they are batched.

    Collecting requests pays only when the backend predicts them together: a backend
    without ``predict_batch``, or one whose ``batches_observations`` is false (say, a
    model that failed its batched check), is served one observation at a time."""
    if config.max_batch_size == 1:
        return "max_batch_size is 1"
    if not callable(getattr(backend, "predict_batch", None)):
        return "the backend has no predict_batch"
    if not getattr(backend, "batches_observations", True):
        return "the backend predicts one observation at a time (see its describe())"
    return None


def _make_worker(backend: PolicyBackend, config: ServerConfig) -> InferenceWorker:
    off = batching_off_reason(backend, config)
    if off is not None and config.max_batch_size > 1:
        logger.info("micro-batching off: %s", off)
    return InferenceWorker(
        predictor(backend),
        config.max_queue,
        config.inference_timeout_s,
        predict_batch=batch_predictor(backend),
        max_batch_size=config.max_batch_size if off is None else 1,
        batch_window_s=config.batch_window_ms / 1e3,
        inline=predicts_inline(backend),
    )


def predicts_inline(backend: PolicyBackend) -> bool:
    """Whether the backend's own class declares its predict cheap (``predicts_inline``).

    Not inherited: a subclass that changes predict (a scripted test backend that
    sleeps, say) makes no such promise by deriving from the stub."""
    return vars(type(backend)).get("predicts_inline", False) is True


def _batching_report(
    worker: InferenceWorker, backend: PolicyBackend, config: ServerConfig
) -> dict[str, Any]:
    """/info's view of micro-batching: the settings and what they have done so far."""
    batcher = worker.batcher
    stats = batcher.stats() if batcher is not None else None
    return {
        "enabled": batcher is not None,
        "off_reason": batching_off_reason(backend, config),
        "max_batch_size": config.max_batch_size,
        "window_ms": config.batch_window_ms,
        "backend_predict_batch": callable(getattr(backend, "predict_batch", None)),
        "batches_total": stats.batches if stats else None,
        "batched_requests_total": stats.requests if stats else None,
        "largest_batch": stats.largest if stats else None,
        "mean_batch_size": (
            round(stats.requests / stats.batches, 3) if stats and stats.batches else None
        ),
        "in_prediction": worker.in_prediction,
    }


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(metrics, exc.status, exc.kind, exc.detail, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _KIND_BY_STATUS.get(exc.status_code, "http_error")
        return error_response(
            metrics, exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        location = tuple(part for part in first.get("loc", ()) if part != "body")
        return error_response(
            metrics, 422, "invalid_request", str(first.get("msg", exc)), field_path(location)
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_request: Request, _exc: ClientDisconnect) -> Response:
        metrics.count_error("client_disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled %s: %s", type(exc).__name__, clip(str(exc), 1000))
        return error_response(metrics, 500, "internal_error", f"{type(exc).__name__}: {exc}")


def _openapi_document(app: FastAPI, auth: bool) -> dict[str, Any]:
    """FastAPI's document (its answers' schemas generated from the models) plus the
    request model's schema, which /infer's requestBody refers to: the route reads its
    body itself, so FastAPI does not see the model."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        _, schemas = models_json_schema(
            [(InferRequest, "validation")], ref_template="#/components/schemas/{model}"
        )
        components = document.setdefault("components", {})
        known = components.setdefault("schemas", {})
        for name, schema in schemas["$defs"].items():
            known.setdefault(name, schema)
        if auth:
            components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
            for path, operations in document["paths"].items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = document
    return app.openapi_schema
