"""OpenTelemetry metrics: where every metric of the service is defined.

Each gunicorn worker builds its own MeterProvider in the app's lifespan, after the fork (a
provider made in the master would be copied into every worker with one identity), with a unique
`service.instance.id` (`<hostname>-<pid>`): workers that shared one would mix their cumulative
counters into one series. Metrics are pushed over OTLP/HTTP to the collector, configured with the
standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_METRIC_EXPORT_INTERVAL, ...), and
OTEL_SDK_DISABLED=true turns all of it off. An unreachable collector costs requests nothing: the
export runs on the reader's own thread, and cumulative aggregation keeps memory bounded.

Instruments (Prometheus names, after the collector's translation, in brackets):

* http.server.request.duration, s: every HTTP request but health checks, with the attributes of
  the stable HTTP semantic conventions (`HttpServerMetrics`) [http_server_request_duration_seconds]
* mnist.predictions: predictions by predicted digit and low confidence [mnist_predictions_total]
  (an asynchronous counter: the worker tallies in a list, the SDK reads the totals at export)
* mnist.prediction.confidence: confidence of each prediction [mnist_prediction_confidence]
* mnist.preprocess.duration, s: decoding and normalising one upload
* mnist.inference.duration, s: one batch through the model
* mnist.edge.wait, s: from nginx forwarding a prediction request (its X-Request-Start stamp) to
  the worker taking it up
* mnist.admission.wait, s: how long a prediction request waited for a place in its worker
* mnist.admission.requests: prediction requests being served and waiting, per worker (a gauge,
  by mnist.state)
* mnist.queue.wait, s: from enqueue to the start of the request's batch
* mnist.batch.size: images per inference call
* mnist.queue.depth: images waiting for inference in this worker (a gauge)
* mnist.rejected: requests refused, by reason: budget (could not be answered within the latency
  budget), queue_full (the admission queue's safety bound), inference_queue_full, not_ready,
  shutting_down, or a bad input's kind
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.inference.batcher import BatchRecord
from app.tracing import Tracing

if TYPE_CHECKING:
    from app.admission import Admission

log = logging.getLogger(__name__)

METER_NAME = "mnist"
# The service answers in about a millisecond: the SDK's default boundaries (and the semantic
# conventions' advisory ones, which start at 5 ms) would put nearly every request in the first
# bucket and make percentiles meaningless.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
FAST_BUCKETS = (
    0.00005,
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
HTTP_DURATION = "http.server.request.duration"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Metrics:
    """The service's instruments. Built from whatever MeterProvider is global: a no-op one
    until `start_provider` installs the real one (the API's proxies then forward to it)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        self.http_duration = meter.create_histogram(
            HTTP_DURATION,
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        # The hottest instrument, so asynchronous: a list tallied by the event loop, read at
        # export (docs/design.md#metrics-at-a-small-cost). Index: digit * 2 + low_confidence.
        self._predicted = [0] * 20
        meter.create_observable_counter(
            "mnist.predictions",
            callbacks=[self._observe_predictions],
            unit="{prediction}",
            description="Predictions, by predicted digit.",
        )
        self.confidence = meter.create_histogram(
            "mnist.prediction.confidence",
            unit="1",
            description="Probability of the predicted digit.",
            explicit_bucket_boundaries_advisory=list(CONFIDENCE_BUCKETS),
        )
        self.preprocess = meter.create_histogram(
            "mnist.preprocess.duration",
            unit="s",
            description="Decoding and normalising one upload.",
            explicit_bucket_boundaries_advisory=list(FAST_BUCKETS),
        )
        self.inference = meter.create_histogram(
            "mnist.inference.duration",
            unit="s",
            description="One batch through the model.",
            explicit_bucket_boundaries_advisory=list(FAST_BUCKETS),
        )
        self.queue_wait = meter.create_histogram(
            "mnist.queue.wait",
            unit="s",
            description="From a request's enqueue to the start of its batch.",
            explicit_bucket_boundaries_advisory=list(FAST_BUCKETS),
        )
        self.edge_wait = meter.create_histogram(
            "mnist.edge.wait",
            unit="s",
            description="From the edge forwarding a prediction request to its worker taking it up.",
            explicit_bucket_boundaries_advisory=list(FAST_BUCKETS),
        )
        self.admission_wait = meter.create_histogram(
            "mnist.admission.wait",
            unit="s",
            description="How long a prediction request waited for a place in its worker.",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        self._admissions: list[Admission] = []
        meter.create_observable_gauge(
            "mnist.admission.requests",
            callbacks=[self._observe_admission],
            unit="{request}",
            description="Prediction requests being served (active) and waiting for a place.",
        )
        self.batch_size = meter.create_histogram(
            "mnist.batch.size",
            unit="{image}",
            description="Images per inference call.",
            explicit_bucket_boundaries_advisory=list(BATCH_BUCKETS),
        )
        self.rejected = meter.create_counter(
            "mnist.rejected", unit="{request}", description="Requests refused, by reason."
        )
        self._depth_sources: list[Callable[[], int]] = []
        meter.create_observable_gauge(
            "mnist.queue.depth",
            callbacks=[self._observe_depth],
            unit="{image}",
            description="Images waiting for inference in this worker.",
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self._depth_sources.append(depth)

    def watch_admission(self, admission: Admission) -> None:
        self._admissions.append(admission)

    def _observe_admission(self, options: CallbackOptions) -> Iterable[Observation]:
        found = []
        for admission in self._admissions:
            found.append(Observation(admission.active, {"mnist.state": "active"}))
            found.append(Observation(admission.waiting, {"mnist.state": "waiting"}))
        return found

    def record_admission(self, edge_wait: float | None, admission_wait: float) -> None:
        if edge_wait is not None:
            self.edge_wait.record(edge_wait)
        self.admission_wait.record(admission_wait)

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(source()) for source in self._depth_sources]

    def _observe_predictions(self, options: CallbackOptions) -> Iterable[Observation]:
        totals = list(self._predicted)  # one consistent copy
        return [
            Observation(count, {"mnist.digit": index // 2, "mnist.low_confidence": bool(index % 2)})
            for index, count in enumerate(totals)
            if count
        ]

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_size.record(record.size)
        self.inference.record(record.finished - record.started)
        batch: dict[str, Any] | None = None
        for wait, trace in zip(record.queue_waits, record.tags, strict=True):
            self.queue_wait.record(wait)
            if isinstance(trace, tracing.RequestTrace):
                if batch is None:
                    batch = {"mnist.batch.number": record.number, "mnist.batch.size": record.size}
                trace.step("mnist.queue.wait", record.started - wait, record.started)
                trace.step("mnist.inference", record.started, record.finished, batch)

    def record_prediction(self, digit: int, confidence: float, low_confidence: bool) -> None:
        self._predicted[digit * 2 + low_confidence] += 1
        self.confidence.record(confidence)

    def record_rejection(self, reason: str) -> None:
        self.rejected.add(1, {"mnist.reason": reason})


# Methods kept as they are in `http.request.method`; any other is "_OTHER" (semantic
# conventions), so that a client cannot make a series per made-up method.
KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE")
)


class HttpServerMetrics:
    """ASGI middleware: `http.server.request.duration` of every request but health checks,
    with the attributes of the stable HTTP semantic conventions
    (https://opentelemetry.io/docs/specs/semconv/http/http-metrics/): http.request.method,
    url.scheme, network.protocol.version, http.route, http.response.status_code, and
    error.type for a 5xx or an exception.

    A dict lookup and one histogram record per request: opentelemetry-instrumentation-fastapi
    costs several times the request itself (docs/design.md#metrics-at-a-small-cost).
    """

    def __init__(
        self,
        app: ASGIApp,
        histogram: Histogram,
        excluded_paths: Iterable[str] = ("/healthz", "/readyz"),
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.histogram = histogram
        self.excluded_paths = frozenset(excluded_paths)
        self.tracing = tracing or Tracing()
        # One attribute set per (method, scheme, version, route, status, error): bounded by
        # the app's routes, the status codes and the exception types of the code. Built once,
        # reused for every request.
        self._attributes: dict[tuple[Any, ...], dict[str, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        tracer = self.tracing.tracer
        request_trace = tracing.begin(scope["headers"]) if tracer is not None else None
        token = tracing.CURRENT.set(request_trace)
        started = request_trace.start if request_trace is not None else perf_counter()
        status = 0

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, send_observed)
        except BaseException as exc:
            error = type(exc).__qualname__
            if not status and isinstance(exc, Exception):
                status = 500  # what Starlette's outermost error handler answers
            raise
        finally:
            ended = perf_counter()
            attributes = self._attributes_of(scope, status, error)
            context = None
            if tracer is not None and request_trace is not None:
                try:
                    context = tracer.finish(
                        request_trace,
                        span_name(attributes),
                        {**attributes, "url.path": scope["path"]},
                        status,
                        error,
                        ended,
                    )
                except Exception:  # telemetry must never break serving
                    log.exception("tracing a request failed")
            tracing.CURRENT.reset(token)
            # A kept trace's context: the measurement carries its trace id as an exemplar.
            self.histogram.record(ended - started, attributes, context=context)

    def _attributes_of(self, scope: Scope, status: int, error: str | None) -> dict[str, Any]:
        route = getattr(scope.get("route"), "path", None)  # set by the router on a match
        # The method is normalised before it is part of the key: made-up methods must not grow
        # this cache any more than they may make series.
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        key = (method, scope["scheme"], scope["http_version"], route, status, error)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {
                "http.request.method": method,
                "url.scheme": scope["scheme"],
                "network.protocol.version": scope["http_version"],
            }
            if route is not None:
                attributes["http.route"] = route
            if status:
                attributes["http.response.status_code"] = status
            if error is not None or status >= 500 or not status:
                attributes["error.type"] = error or (str(status) if status else "_OTHER")
            self._attributes[key] = attributes
        return attributes


def span_name(attributes: dict[str, Any]) -> str:
    """`{method} {route}`, or the method alone for no route (HTTP semantic conventions)."""
    route = attributes.get("http.route")
    method = attributes["http.request.method"]
    return f"{method} {route}" if route else method


def worker_resource(service_version: str) -> Any:
    """This worker's identity, shared by its metrics and its traces."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "mnist-api"),
            "service.version": service_version,
            "service.instance.id": instance_id(),
            "host.name": socket.gethostname(),
        }
    )


def build_provider(service_version: str, readers: list[Any], exemplars: bool = False) -> Any:
    """A MeterProvider with this worker's identity. `exemplars`: measurements made in a kept
    trace carry its trace id (the SDK's trace-based filter); without traces the filter would
    only pay to look for one on every measurement. OTEL_METRICS_EXEMPLAR_FILTER, when set,
    decides either way (the SDK reads it given None)."""
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider

    exemplar_filter = (
        None
        if exemplars or os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER")
        else AlwaysOffExemplarFilter()
    )
    return MeterProvider(
        resource=worker_resource(service_version),
        metric_readers=readers,
        exemplar_filter=exemplar_filter,
    )


def start_provider(service_version: str, exemplars: bool = False) -> Callable[[], None]:
    """Install this worker's MeterProvider, exporting over OTLP; returns its shutdown, which
    flushes the last export."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    provider = build_provider(
        service_version, [PeriodicExportingMetricReader(OTLPMetricExporter())], exemplars
    )
    metrics.set_meter_provider(provider)
    log.info("metrics: OTLP export as %s", instance_id())

    def shutdown() -> None:
        try:
            provider.shutdown(timeout_millis=5000)
        except Exception:  # the collector may be gone; nothing to do about it now
            log.warning("metrics: final export failed", exc_info=True)

    return shutdown
