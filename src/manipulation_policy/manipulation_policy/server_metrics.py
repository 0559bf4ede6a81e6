"""Server metrics and their Prometheus text exposition (format 0.0.4), without dependencies.

Counters, gauges and histograms are thread-safe: requests are counted on the
event loop, inference time on the inference thread, and /info reads both.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; spans a stub answer (sub-millisecond) to a slow 7B model on a busy GPU.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

LabelValues = tuple[str, ...]
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, documentation: str, label_names: Sequence[str] = ()):
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def samples(self) -> Iterator[tuple[str, str, float]]:
        """(sample name, rendered labels, value) for every series."""
        raise NotImplementedError

    def render(self) -> str:
        lines = [
            f"# HELP {self.name} {_escape_help(self.documentation)}",
            f"# TYPE {self.name} {self.kind}",
        ]
        lines.extend(
            f"{name}{labels} {_format_value(value)}" for name, labels, value in self.samples()
        )
        return "\n".join(lines)


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, documentation: str, label_names: Sequence[str] = ()):
        super().__init__(name, documentation, label_names)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def values(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def total(self) -> float:
        return sum(self.values().values())

    def samples(self) -> Iterator[tuple[str, str, float]]:
        for key, value in sorted(self.values().items()):
            yield self.name, _format_labels(self.label_names, key), value


class Gauge(_Metric):
    """A gauge read from a callback at exposition time (the truth lives elsewhere)."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, read: Callable[[], float]):
        super().__init__(name, documentation)
        self._read = read

    def samples(self) -> Iterator[tuple[str, str, float]]:
        yield self.name, "", float(self._read())


class InfoGauge(_Metric):
    """A constant 1 whose labels carry facts (version, backend, model)."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labels: dict[str, str]):
        super().__init__(name, documentation, tuple(labels))
        self._values = tuple(str(v) for v in labels.values())

    def samples(self) -> Iterator[tuple[str, str, float]]:
        yield self.name, _format_labels(self.label_names, self._values), 1.0


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        label_names: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ):
        super().__init__(name, documentation, label_names)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("histogram buckets must be distinct and increasing")
        self.buckets = tuple(float(b) for b in buckets)
        # per series: (count per bucket, the +Inf bucket last), sum
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}
        if not self.label_names:  # an unlabelled histogram shows zeros from the start
            self._series[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                index = i
                break
        with self._lock:
            counts, total = self._series.setdefault(
                key, ([0] * (len(self.buckets) + 1), [0.0])
            )
            counts[index] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return sum(series[0]) if series else 0

    def samples(self) -> Iterator[tuple[str, str, float]]:
        with self._lock:
            snapshot = {k: (list(c), s[0]) for k, (c, s) in self._series.items()}
        for key, (counts, total) in sorted(snapshot.items()):
            cumulative = 0
            bounds = [_format_value(b) for b in self.buckets] + ["+Inf"]
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                labels = _format_labels(self.label_names + ("le",), key + (bound,))
                yield f"{self.name}_bucket", labels, cumulative
            plain = _format_labels(self.label_names, key)
            yield f"{self.name}_sum", plain, total
            yield f"{self.name}_count", plain, cumulative


class ServerMetrics:
    """Everything the policy server counts, and its /metrics text."""

    def __init__(
        self,
        queue_depth: Callable[[], float] = lambda: 0,
        inference_busy: Callable[[], float] = lambda: 0,
        info_labels: Optional[dict[str, str]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._clock = clock
        self.started = clock()
        self.requests = Counter(
            "policy_server_requests_total",
            "HTTP requests answered, by endpoint, method and status code.",
            ("endpoint", "method", "status"),
        )
        self.request_seconds = Histogram(
            "policy_server_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            ("endpoint",),
        )
        self.preprocess_seconds = Histogram(
            "policy_server_preprocess_duration_seconds",
            "Time to parse and validate an /infer body and decode its image.",
        )
        self.inference_seconds = Histogram(
            "policy_server_inference_duration_seconds",
            "Time the backend spent in predict() for one /infer request.",
        )
        self.batch_size = Histogram(
            "policy_server_batch_size",
            "Observations the backend predicted together in one call (1 without batching).",
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.errors = Counter(
            "policy_server_errors_total",
            "Requests answered with an error, by kind (the error field of the body).",
            ("kind",),
        )
        self._metrics: list[_Metric] = [
            self.requests,
            self.request_seconds,
            self.preprocess_seconds,
            self.inference_seconds,
            self.batch_size,
            self.errors,
            Gauge(
                "policy_server_queue_depth",
                "Admitted /infer requests waiting for the model (decoding or queued).",
                queue_depth,
            ),
            Gauge(
                "policy_server_inference_in_progress",
                "1 while the backend is running a prediction.",
                inference_busy,
            ),
            Gauge(
                "policy_server_uptime_seconds",
                "Seconds since the server started.",
                self.uptime_seconds,
            ),
        ]
        if info_labels:
            self._metrics.append(
                InfoGauge("policy_server_info", "Server version and backend.", info_labels)
            )

    def uptime_seconds(self) -> float:
        return self._clock() - self.started

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        # Any client picks the method (and nothing checks it before this): an unknown one
        # shares one label, so no client can grow the number of series.
        method = method if method in HTTP_METHODS else "other"
        status_label = str(status) if 100 <= status <= 599 else "other"
        self.requests.inc(endpoint=endpoint, method=method, status=status_label)
        self.request_seconds.observe(seconds, endpoint=endpoint)

    def count_error(self, kind: str) -> None:
        self.errors.inc(kind=kind)

    def errors_by_kind(self) -> dict[str, int]:
        return {key[0]: int(value) for key, value in sorted(self.errors.values().items())}

    def requests_total(self) -> int:
        return int(self.requests.total())

    def render(self) -> str:
        return "\n".join(metric.render() for metric in self._metrics) + "\n"
