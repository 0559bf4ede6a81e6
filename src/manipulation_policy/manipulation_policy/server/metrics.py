"""What the policy server counts, exposed in the Prometheus text format by prometheus_client.

Each ServerMetrics has its own CollectorRegistry (never the process-wide default),
so that several apps in one process, as in the tests, count apart. prometheus_client's
metrics are thread-safe: requests are counted on the event loop, inference time on
the inference thread, and /info reads both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# The classic text format (0.0.4) that generate_latest writes.
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds; spans a stub answer (sub-millisecond) to a slow 7B model on a busy GPU.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Closings that answer the request with an error: the kind of that error.
CONNECTION_ERROR_KINDS = {
    "header_timeout": "header_timeout",
    "body_timeout": "body_timeout",
    "body_too_slow": "body_too_slow",
    "body_readers_full": "too_many_bodies",
    "headers_too_large": "headers_too_large",
}

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def counter_values(counter: Counter) -> dict[tuple[str, ...], float]:
    """A labelled counter's series: label values (in label-name order) -> count."""
    values: dict[tuple[str, ...], float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values[tuple(sample.labels[name] for name in counter._labelnames)] = sample.value
    return values


class ServerMetrics:
    """Everything the policy server counts, and its /metrics text."""

    def __init__(
        self,
        queue_depth: Callable[[], float] = lambda: 0,
        inference_busy: Callable[[], float] = lambda: 0,
        model_instances: Callable[[], float] = lambda: 1,
        instances_stuck: Callable[[], float] = lambda: 0,
        open_connections: Callable[[], float] = lambda: 0,
        bodies_reading: Callable[[], float] = lambda: 0,
        info_labels: Optional[dict[str, str]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        # The *_created series would double what a scrape carries, for a start time
        # that policy_server_uptime_seconds already tells.
        disable_created_metrics()
        self._clock = clock
        self.started = clock()
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "policy_server_requests_total",
            "HTTP requests answered, by endpoint, method and status code.",
            ("endpoint", "method", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "policy_server_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.preprocess_seconds = Histogram(
            "policy_server_preprocess_duration_seconds",
            "Time to parse and validate an /infer body and decode its image.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "policy_server_inference_duration_seconds",
            "Time the backend spent in predict() for one /infer request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "policy_server_batch_size",
            "Observations the backend predicted together in one call (1 without batching).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "policy_server_errors_total",
            "Requests answered with an error, by kind (the error field of the body).",
            ("kind",),
            registry=registry,
        )
        for name, documentation, read in (
            (
                "policy_server_queue_depth",
                "Admitted /infer requests waiting for the model (decoding or queued).",
                queue_depth,
            ),
            (
                "policy_server_inference_in_progress",
                "Model instances running a prediction or a batch now (0 or 1 with one "
                "instance).",
                inference_busy,
            ),
            (
                "policy_server_model_instances",
                "Backend instances serving predictions, each on its own model thread.",
                model_instances,
            ),
            (
                "policy_server_model_instances_stuck",
                "Model instances whose running call is past its deadline (out of service "
                "until the backend returns).",
                instances_stuck,
            ),
            (
                "policy_server_open_connections",
                "HTTP connections open (capped below the open-file limit).",
                open_connections,
            ),
            (
                "policy_server_bodies_reading",
                "Request bodies still arriving, each holding a reader place.",
                bodies_reading,
            ),
            (
                "policy_server_uptime_seconds",
                "Seconds since the server started.",
                self.uptime_seconds,
            ),
        ):
            Gauge(name, documentation, registry=registry).set_function(read)
        self.connections_closed = Counter(
            "policy_server_connections_closed_total",
            "Connections the server closed or refused itself, by reason (idle_timeout, "
            "header_timeout, body_timeout, body_too_slow, body_readers_full, headers_too_large, "
            "evicted, "
            "over_limit).",
            ("reason",),
            registry=registry,
        )
        self._closed_by_reason: dict[str, Counter] = {}
        if info_labels:
            info = Gauge(
                "policy_server_info",
                "Server version and backend.",
                tuple(info_labels),
                registry=registry,
            )
            info.labels(**{name: str(value) for name, value in info_labels.items()}).set(1)

    def uptime_seconds(self) -> float:
        return self._clock() - self.started

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        # Any client picks the method (and nothing checks it before this): an unknown one
        # shares one label, so no client can grow the number of series.
        method = method if method in HTTP_METHODS else "other"
        status_label = str(status) if 100 <= status <= 599 else "other"
        self.requests.labels(endpoint, method, status_label).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def count_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def count_connection_closed(self, reason: str) -> None:
        # Counted once per connection in a flood of them: the labelled child is kept.
        child = self._closed_by_reason.get(reason)
        if child is None:
            child = self._closed_by_reason[reason] = self.connections_closed.labels(reason)
        child.inc()
        if reason in CONNECTION_ERROR_KINDS:
            self.count_error(CONNECTION_ERROR_KINDS[reason])

    def errors_by_kind(self) -> dict[str, int]:
        return {key[0]: int(value) for key, value in sorted(counter_values(self.errors).items())}

    def requests_total(self) -> int:
        return int(sum(counter_values(self.requests).values()))

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
