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
* mnist.admission.overloads: overloads begun, per worker (at a standing queue, until the worker
  catches up; in one a request waits a tenth of the budget at most, the newest first)
* mnist.admission.overload.requests: prediction requests that arrived in an overload
* mnist.queue.wait, s: from enqueue to the start of the request's batch
* mnist.batch.size: images per inference call
* mnist.queue.depth: images waiting for inference in this worker (a gauge)
* mnist.worker.stopping: 1 once the worker has begun a graceful stop (its last export says so)
* mnist.rejected: requests refused, by reason: budget (could not be answered within the latency
  budget), queue_full (the admission queue's safety bound), inference_queue_full, not_ready,
  shutting_down, or a bad input's kind
"""

from __future__ import annotations

import logging
import math
import os
import socket
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
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


class Series:
    """One attribute set's histogram: bucket counts, sum, min, max, and per bucket the last
    exemplar since the previous export (as the SDK's aligned-bucket reservoir keeps them)."""

    __slots__ = ("attributes", "bounds", "counts", "exemplars", "max", "min", "sum")

    def __init__(self, attributes: Mapping[str, Any], bounds: tuple[float, ...]) -> None:
        self.attributes = attributes
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # bucket i: (bounds[i-1], bounds[i]]
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.exemplars: list[Exemplar | None] = []

    def record(self, value: float, trace: tracing.RequestTrace | None = None) -> None:
        index = bisect_left(self.bounds, value)
        # The count last: an export in between sees a sum and extremes ahead of the counts
        # (made good by the next export), never a count without them.
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.counts[index] += 1
        if trace is not None:  # a kept trace: this measurement is its exemplar
            # One read of the list: the export thread may swap it for an empty one meanwhile
            # (the exemplar then lands in the list it took, in time for its export or too late
            # and lost, or in the next).
            exemplars = self.exemplars
            if not exemplars:
                exemplars = self.exemplars = [None] * len(self.counts)
            exemplars[index] = Exemplar({}, value, time_ns(), trace.span_id, trace.trace_id)

    def point(self, start: int, now: int) -> HistogramDataPoint | None:
        counts = list(self.counts)  # one copy: the event loop may record meanwhile
        count = sum(counts)
        if not count:
            return None
        exemplars, self.exemplars = self.exemplars, []
        return HistogramDataPoint(
            attributes=self.attributes,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=count,
            sum=self.sum,
            bucket_counts=counts,
            explicit_bounds=self.bounds,
            min=self.min,
            max=self.max,
            exemplars=[e for e in exemplars if e is not None],
        )


class _Off(Series):
    """The series of a disabled histogram: records nothing."""

    __slots__ = ()

    def record(self, value: float, trace: tracing.RequestTrace | None = None) -> None:
        pass


class FastHistogram:
    """A histogram aggregated here and exported with the SDK's metrics (`Metrics.merged`): a
    bisect and a few additions per measurement, a fraction of the SDK's synchronous histogram's
    cost (a Measurement object, the attributes' hash, a lock; measured in
    docs/design.md#metrics-at-a-small-cost). A series per attribute
    set, made once (`series`); cumulative, as the Collector's Prometheus exporter takes them.
    Recorded on the event loop; read by the export thread, which copies each series' counts at
    once (a measurement being recorded meanwhile shows in the next export)."""

    def __init__(
        self, name: str, unit: str, description: str, bounds: Sequence[float], enabled: bool
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.bounds = tuple(bounds)
        self.enabled = enabled
        self._series: list[Series] = []
        self._default: Series | None = None

    def series(self, attributes: Mapping[str, Any]) -> Series:
        """The series of these attributes (call once per attribute set, and keep it)."""
        made = (Series if self.enabled else _Off)(dict(attributes), self.bounds)
        self._series.append(made)
        return made

    def record(self, value: float) -> None:
        """Record in the series without attributes."""
        if self._default is None:
            self._default = self.series({})
        self._default.record(value)

    def metric(self, start: int, now: int) -> Metric | None:
        """The cumulative histogram since `start` (epoch ns), or None before any measurement."""
        points = [p for series in list(self._series) if (p := series.point(start, now))]
        if not points:
            return None
        return Metric(
            self.name,
            self.description,
            self.unit,
            Histogram(points, AggregationTemporality.CUMULATIVE),
        )


class Metrics:
    """The service's instruments. Built from whatever MeterProvider is global: a no-op one
    until `start_provider` installs the real one (the API's proxies then forward to it)."""

    def __init__(
        self, meter_provider: metrics.MeterProvider | None = None, enabled: bool = True
    ) -> None:
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        self.enabled = enabled
        self.started = time_ns()
        # The histograms: aggregated here, exported with the SDK's metrics (`merged`).
        self.histograms: list[FastHistogram] = []
        self.http_duration = self._histogram(
            HTTP_DURATION, "s", "Duration of HTTP server requests.", LATENCY_BUCKETS
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
        self.confidence = self._histogram(
            "mnist.prediction.confidence",
            "1",
            "Probability of the predicted digit.",
            CONFIDENCE_BUCKETS,
        )
        self.preprocess = self._histogram(
            "mnist.preprocess.duration", "s", "Decoding and normalising one upload.", FAST_BUCKETS
        )
        self.inference = self._histogram(
            "mnist.inference.duration", "s", "One batch through the model.", FAST_BUCKETS
        )
        self.queue_wait = self._histogram(
            "mnist.queue.wait",
            "s",
            "From a request's enqueue to the start of its batch.",
            FAST_BUCKETS,
        )
        self.edge_wait = self._histogram(
            "mnist.edge.wait",
            "s",
            "From the edge forwarding a prediction request to its worker taking it up.",
            FAST_BUCKETS,
        )
        self.admission_wait = self._histogram(
            "mnist.admission.wait",
            "s",
            "How long a prediction request waited for a place in its worker.",
            LATENCY_BUCKETS,
        )
        self._admissions: list[Admission] = []
        meter.create_observable_gauge(
            "mnist.admission.requests",
            callbacks=[self._observe_admission],
            unit="{request}",
            description="Prediction requests being served (active) and waiting for a place.",
        )
        meter.create_observable_counter(
            "mnist.admission.overloads",
            callbacks=[self._observe_overloads],
            unit="{overload}",
            description="Overloads begun: a standing queue of most of the latency budget.",
        )
        meter.create_observable_counter(
            "mnist.admission.overload.requests",
            callbacks=[self._observe_overload_requests],
            unit="{request}",
            description="Prediction requests that arrived in an overload.",
        )
        self.batch_size = self._histogram(
            "mnist.batch.size", "{image}", "Images per inference call.", BATCH_BUCKETS
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
        # Set when the worker begins a graceful stop; the last export before it exits says so,
        # which tells a replica scaled away or rolled out from one that went missing.
        self.stopping = False
        meter.create_observable_gauge(
            "mnist.worker.stopping",
            callbacks=[self._observe_stopping],
            unit="",  # no unit: "1" would make it mnist_worker_stopping_ratio in Prometheus
            description="1 once this worker has begun a graceful stop, else 0.",
        )

    def _histogram(
        self, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> FastHistogram:
        histogram = FastHistogram(name, unit, description, bounds, self.enabled)
        self.histograms.append(histogram)
        return histogram

    def merged(self, data: MetricsData) -> MetricsData:
        """`data` (what the SDK collected) with the histograms added to this meter's scope.
        They ride with the SDK's own metrics: the SDK exports only when it collected something,
        which the observable gauges (queue depth, admission) make every time."""
        now = time_ns()
        extra = [m for h in self.histograms if (m := h.metric(self.started, now)) is not None]
        if not extra or not data.resource_metrics:
            return data
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, scope in enumerate(scopes):
            if scope.scope.name == METER_NAME:
                scopes[index] = ScopeMetrics(
                    scope.scope, [*scope.metrics, *extra], scope.schema_url
                )
                break
        else:
            scopes.append(ScopeMetrics(InstrumentationScope(METER_NAME), extra, ""))
        resource = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData([resource, *rest])

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

    def _observe_overloads(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(admission.overloads) for admission in self._admissions]

    def _observe_overload_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(admission.overload_arrivals) for admission in self._admissions]

    def record_admission(self, edge_wait: float | None, admission_wait: float) -> None:
        if edge_wait is not None:
            self.edge_wait.record(edge_wait)
        self.admission_wait.record(admission_wait)

    def _observe_stopping(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(int(self.stopping))]

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
        if record.error is None:  # a failed run's time is not the model's latency
            self.inference.record(record.finished - record.started)
        batch: dict[str, Any] | None = None
        traced: set[int] = set()  # a request with several images in the batch: its spans once
        for wait, trace in zip(record.queue_waits, record.tags, strict=True):
            self.queue_wait.record(wait)
            if isinstance(trace, tracing.RequestTrace) and id(trace) not in traced:
                traced.add(id(trace))
                if batch is None:
                    batch = {"mnist.batch.number": record.number, "mnist.batch.size": record.size}
                    if record.error is not None:
                        batch[tracing.ERROR_TYPE] = record.error
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
        histogram: FastHistogram,
        excluded_paths: Iterable[str] = ("/healthz", "/readyz"),
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.histogram = histogram
        self.excluded_paths = frozenset(excluded_paths)
        self.tracing = tracing or Tracing()
        # One attribute set, its series and its span name, per (method, scheme, version,
        # route, status, error): bounded by the app's routes, the status codes and the
        # exception types of the code. Built once, reused for every request.
        self._attributes: dict[tuple[Any, ...], tuple[dict[str, Any], Series, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        tracer = self.tracing.tracer
        if tracer is not None:
            request_trace = tracing.begin(scope["headers"])
            token = tracing.CURRENT.set(request_trace)
            started = request_trace.start
        else:
            started = perf_counter()
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
            attributes, series, name = self._attributes_of(scope, status, error)
            kept = None
            if tracer is not None:
                try:
                    path = scope["path"]
                    if tracer.finish(request_trace, name, attributes, path, status, error, ended):
                        kept = request_trace
                except Exception:  # telemetry must never break serving
                    log.exception("tracing a request failed")
                tracing.CURRENT.reset(token)
            # A kept trace: the measurement carries its trace id as an exemplar.
            series.record(ended - started, kept)

    def _attributes_of(
        self, scope: Scope, status: int, error: str | None
    ) -> tuple[dict[str, Any], Series, str]:
        route = getattr(scope.get("route"), "path", None)  # set by the router on a match
        # The method is normalised before it is part of the key: made-up methods must not grow
        # this cache any more than they may make series.
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        key = (method, scope["scheme"], scope["http_version"], route, status, error)
        found = self._attributes.get(key)
        if found is None:
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
            found = (attributes, self.histogram.series(attributes), span_name(attributes))
            self._attributes[key] = found
        return found


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


def build_provider(service_version: str, readers: list[Any]) -> Any:
    """A MeterProvider with this worker's identity. Its exemplar filter is off: the
    histograms that carry exemplars are the app's own (FastHistogram), and the SDK's filter
    would only pay to look for a span on every measurement. OTEL_METRICS_EXEMPLAR_FILTER, when
    set, still decides (the SDK reads it given None)."""
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider

    exemplar_filter = (
        None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
    )
    return MeterProvider(
        resource=worker_resource(service_version),
        metric_readers=readers,
        exemplar_filter=exemplar_filter,
    )


class WithHistograms(MetricExporter):
    """Exports, with `inner`, what the SDK collected plus `metrics`' own histograms."""

    def __init__(self, inner: MetricExporter, metrics: Metrics) -> None:
        # FastHistogram is cumulative only: a delta preference would mix the two.
        temporality = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "")
        if temporality.strip().lower() not in ("", "cumulative"):
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE={temporality!r}: only "
                "cumulative is supported (the Collector's Prometheus exporter takes it)"
            )
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.metrics = metrics

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return self.inner.export(self.metrics.merged(metrics_data), timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis, **kwargs)


def start_provider(service_version: str, metrics_: Metrics) -> Callable[[], None]:
    """Install this worker's MeterProvider, exporting `metrics_` over OTLP; returns its
    shutdown, which flushes the last export."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    exporter = WithHistograms(OTLPMetricExporter(), metrics_)
    provider = build_provider(service_version, [PeriodicExportingMetricReader(exporter)])
    metrics.set_meter_provider(provider)
    log.info("metrics: OTLP export as %s", instance_id())

    def shutdown() -> None:
        try:
            provider.shutdown(timeout_millis=5000)
        except Exception:  # the collector may be gone; nothing to do about it now
            log.warning("metrics: final export failed", exc_info=True)

    return shutdown
