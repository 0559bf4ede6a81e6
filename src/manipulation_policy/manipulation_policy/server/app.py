"""The policy server's HTTP application: its configuration, routes and /infer's steps.

/infer reads its body itself (buffered whole with a deadline by http_protocol.py, then
admitted by middleware.py, bounded by http_body.py), decodes it with request_decoding.py and answers
errors as errors.py writes them. The OpenAPI document is generated from the
contract's models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema

from manipulation_policy import __version__
from manipulation_policy.backends import (
    PolicyBackend,
    backend_inputs,
    batch_predictor,
    predictor,
)
from manipulation_policy.core.contract import (
    ErrorResponse,
    HealthResponse,
    InferRequest,
    InferResponse,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import DEFAULT_MAX_IMAGE_PIXELS
from manipulation_policy.core.policy_inputs import check_observation, inputs_to_wire
from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.answer import BackendAnswerError, checked_response
from manipulation_policy.server.auth import OPEN_PATHS, BearerAuthMiddleware
from manipulation_policy.server.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE
from manipulation_policy.server.connection_guard import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BODY_READERS,
    ConnectionGuard,
    ConnectionLimits,
)
from manipulation_policy.server.errors import (
    CLIENT_CLOSED_REQUEST,
    ApiError,
    error_response,
    install_error_handlers,
    json_answer,
)
from manipulation_policy.server.http_body import check_json_content_type, read_body
from manipulation_policy.server.inference_worker import (
    DEFAULT_DEADLINE_S,
    BackendStuckError,
    ClientGoneError,
    InferenceWorker,
    ModelInstance,
    PredictionTimeoutError,
)
from manipulation_policy.server.log_limits import printable
from manipulation_policy.server.metrics import EXPOSITION_CONTENT_TYPE, ServerMetrics
from manipulation_policy.server.middleware import (
    AdmissionMiddleware,
    RefusalPacer,
    RequestMetricsMiddleware,
    refuses_at_once,
)
from manipulation_policy.server.model_slots import MAX_MODEL_INSTANCES
from manipulation_policy.server.reports import gpu_memory_report, runtime_report
from manipulation_policy.server.request_decoding import (
    decode_infer_body,
    decode_inline,
    is_large_body,
    observation_of,
    parse_infer_body,
    parse_inline,
)

logger = logging.getLogger("manipulation_policy.policy_server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8
# A window longer than this would make every robot wait for nothing.
MAX_BATCH_WINDOW_MS = 1000.0


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
    # Backend instances, each on its own model thread: up to this many model calls at once.
    model_instances: int = 1
    # Connections (connection_guard.py; enforced by http_protocol.py under uvicorn).
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    body_min_rate: float = 0.0
    max_body_readers: int = DEFAULT_MAX_BODY_READERS
    max_connections: Optional[int] = None

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            idle_timeout_s=self.idle_timeout_s,
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            body_min_rate=self.body_min_rate,
            max_buffered_body_bytes=self.max_body_bytes,
            max_body_readers=self.max_body_readers,
            max_connections=self.max_connections,
        )

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
        if not 1 <= self.model_instances <= MAX_MODEL_INSTANCES:
            raise ValueError(
                f"model_instances must be 1 to {MAX_MODEL_INSTANCES}, got {self.model_instances}"
            )
        if not 0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS:
            raise ValueError(
                f"batch_window_ms must be in [0, {MAX_BATCH_WINDOW_MS:g}], "
                f"got {self.batch_window_ms}"
            )
        self.connection_limits()  # raises ValueError naming the limit at fault


def _error(description: str) -> dict[str, Any]:
    """An error answer in the OpenAPI document: FastAPI writes ErrorResponse's schema."""
    return {"model": ErrorResponse, "description": description}


# The answers of POST /infer; their schemas come from the models (contract.py).
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The policy's answer: an action chunk under actions (with action_period_sec), "
            "its first action also in the top-level PolicyOutput fields, every one present."
        )
    },
    400: _error("The body is not valid JSON (NaN/Infinity included); names the field."),
    401: _error("Missing or wrong bearer token (only when an API key is set)."),
    408: _error(
        "The headers or the body did not arrive within the server's deadline "
        "(--header-timeout, --body-timeout, --body-min-rate); the connection is closed."
    ),
    413: _error("The body exceeds the server's size limit."),
    415: _error("Content-Type is not JSON."),
    431: _error("The request line and headers exceed 64 KiB; the connection is closed."),
    422: _error("A field has the wrong type or value, or the image is unusable."),
    500: _error("The backend failed or its answer broke the contract (not the client's fault)."),
    503: {
        **_error(
            "Too many requests waiting for the model, too many bodies arriving at once "
            "(too_many_bodies), or a prediction is stuck past its deadline; retry after "
            "Retry-After s."
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    504: _error("The prediction did not finish within the server's deadline."),
}


def backend_description(backend: PolicyBackend) -> dict[str, Any]:
    try:
        return dict(backend.describe())
    except Exception as exc:  # noqa: BLE001
        return {"error": f"describe() failed: {type(exc).__name__}: {exc}"}


def create_app(
    backend: PolicyBackend | Sequence[PolicyBackend], config: Optional[ServerConfig] = None
) -> FastAPI:
    """The FastAPI application serving ``backend`` (already loaded), or one model
    instance per backend of a list (``config.model_instances`` of them, the same
    backend loaded that many times)."""
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
    app.state.connection_guard = server.connection_guard
    _add_routes(app, server)
    install_error_handlers(app, server.metrics)
    _add_middleware(app, server)
    app.openapi = lambda: _openapi_document(app, auth=server.config.api_key is not None)
    return app


class PolicyService:
    """What the routes do: the worker, the decode pool and the metrics of one app."""

    def __init__(
        self, backend: PolicyBackend | Sequence[PolicyBackend], config: ServerConfig
    ):
        backends = list(backend) if isinstance(backend, (list, tuple)) else [backend]
        if len(backends) != config.model_instances:
            raise ValueError(
                f"model_instances is {config.model_instances}, but {len(backends)} "
                "backend instances were given"
            )
        # The first instance speaks for all (the same backend, the same options).
        backend = self.backend = backends[0]
        # Where each instance runs (--instance-devices may place them apart).
        self.instance_devices = [backend_description(b).get("device") for b in backends]
        self.config = config
        # What the backend reads (None: it declares nothing); each request is checked
        # against it before it is queued.
        self.inputs = backend_inputs(backend)
        self.worker = _make_worker(backends, config)
        self.decode_pool = ThreadPoolExecutor(
            config.decode_threads, thread_name_prefix="policy-decode"
        )
        # Large bodies one at a time on their own thread: their JSON parse holds the GIL
        # for ~15 ms (7 MiB), two at once would stall the event loop twice as long, and
        # a robot's small body does not wait behind them.
        self.large_decode_pool = ThreadPoolExecutor(1, thread_name_prefix="policy-decode-large")
        self.loop_type: Optional[type] = None  # the event loop serving the app, for /info
        self.connection_guard = ConnectionGuard(config.connection_limits())
        description = backend_description(backend)
        worker = self.worker
        guard = self.connection_guard
        self.metrics = ServerMetrics(
            queue_depth=lambda: worker.queue_depth,
            inference_busy=lambda: worker.busy,
            model_instances=lambda: worker.model_instances,
            instances_stuck=worker.stuck_instances,
            open_connections=lambda: guard.open_connections,
            bodies_reading=lambda: guard.body_readers,
            info_labels={
                "version": __version__,
                "backend": str(description.get("backend", getattr(backend, "name", "unknown"))),
                "model": str(description.get("model", "")),
            },
        )
        guard.on_close_reason = self.metrics.count_connection_closed
        self.pacer = RefusalPacer()
        pacer = self.pacer
        guard.refuses_at_once = lambda scope: refuses_at_once(scope, worker, pacer)
        if worker.batcher is not None:
            worker.batcher.on_batch = lambda size, _s: self.metrics.batch_size.observe(size)

    def close(self) -> None:
        self.worker.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.large_decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- routes ---------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        problem = self.worker.health_problem()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def post_infer(self, request: Request) -> Response:
        """One observation in, one policy answer (an action chunk) out (run alone, or
        batched with others)."""
        # Admitted already (AdmissionMiddleware), with the body in (http_protocol.py).
        check_json_content_type(request.headers.get("content-type"))
        raw = await read_body(request, self.config.max_body_bytes)
        parsed, observation = await self.decode(raw)
        self.check_inputs(observation)
        try:
            answer, seconds = await self.predict(observation, request)
        except ClientGoneError:
            self.metrics.count_error("client_disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        self.metrics.inference_seconds.observe(seconds)
        if self.worker.batcher is None:
            self.metrics.batch_size.observe(1)
        try:
            body = checked_response(
                answer, request_id=parsed.request_id, inference_time_ms=round(seconds * 1e3, 3)
            )
        except BackendAnswerError as exc:
            logger.error("backend answer refused: %s", printable(str(exc), 1000))
            raise ApiError(
                500,
                "backend_error",
                f"the backend's answer breaks the response contract: {exc}",
                exc.field,
            ) from None
        return json_answer(body)

    def check_inputs(self, observation: Observation) -> None:
        """422 naming ``images.<name>`` or ``state`` when the observation lacks what the
        backend reads (a request that cannot be answered never waits in the queue)."""
        if self.inputs is None:
            return
        try:
            check_observation(self.inputs, observation)
        except InputError as exc:
            raise ApiError.from_input_error(422, "invalid_request", exc) from None

    def info(self) -> JSONResponse:
        described = backend_description(self.backend)
        metrics, worker, config = self.metrics, self.worker, self.config
        inputs = {} if self.inputs is None else {"inputs": inputs_to_wire(self.inputs)}
        return JSONResponse(
            {
                "version": __version__,
                "backend": described,
                **inputs,
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
                "model_instances": worker.model_instances,
                "instances": _instances_report(worker, self.instance_devices),
                "batching": _batching_report(worker, self.backend, config),
                "limits": {
                    "max_body_bytes": config.max_body_bytes,
                    "max_image_pixels": config.max_image_pixels,
                    "inference_timeout_s": config.inference_timeout_s,
                },
                "connections": self.connection_guard.report(),
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
            pool = self.large_decode_pool if is_large_body(len(raw)) else self.decode_pool
            decoded = await loop.run_in_executor(pool, decode_infer_body, raw, limit)
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

    async def predict(self, observation: Observation, request: Request) -> tuple[Any, float]:
        """(the backend's answer as ``backends.predictor`` gives it, seconds it took)."""
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
                printable(str(exc), 1000),
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
                    "Unhealthy: a prediction is stuck past its deadline (on every model "
                    "instance, when there are several); the reason says since when."
                ),
            },
        },
    )
    app.add_api_route(
        "/infer",
        server.post_infer,
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
        AdmissionMiddleware,
        worker=server.worker,
        refuse=server.refuse_admission,
        pacer=server.pacer,
    )
    if server.config.api_key is not None:
        app.add_middleware(
            BearerAuthMiddleware, key=server.config.api_key, reject=server.unauthorized
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=server.metrics)


def batching_problem(backend: PolicyBackend, config: ServerConfig) -> Optional[str]:
    """Why observations are predicted one at a time (the problem that keeps
    micro-batching off), or None when they are batched.

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


def _make_worker(backends: Sequence[PolicyBackend], config: ServerConfig) -> InferenceWorker:
    problem = batching_problem(backends[0], config)
    if problem is not None and config.max_batch_size > 1:
        logger.info("micro-batching off: %s", problem)
    return InferenceWorker(
        [ModelInstance(predictor(b), batch_predictor(b)) for b in backends],
        config.max_queue,
        config.inference_timeout_s,
        max_batch_size=config.max_batch_size if problem is None else 1,
        batch_window_s=config.batch_window_ms / 1e3,
    )


def _instances_report(worker: InferenceWorker, devices: Sequence[Any]) -> dict[str, Any]:
    """/info's view of the model instances: how many are busy and stuck, and each (with
    the device its backend describes)."""
    each = [
        {**instance, "device": device}
        for instance, device in zip(worker.instances_report(), devices, strict=True)
    ]
    return {
        "busy": sum(instance["busy"] for instance in each),
        "stuck": sum(instance["stuck"] for instance in each),
        "each": each,
    }


def _batching_report(
    worker: InferenceWorker, backend: PolicyBackend, config: ServerConfig
) -> dict[str, Any]:
    """/info's view of micro-batching: the settings and what they have done so far."""
    batcher = worker.batcher
    stats = batcher.stats() if batcher is not None else None
    return {
        "enabled": batcher is not None,
        "off_reason": batching_problem(backend, config),
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
