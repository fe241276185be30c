"""OpenTelemetry metrics: where every metric of the service is defined.

Each gunicorn worker builds its own MeterProvider in the app's lifespan, after the fork (a
provider made in the master would be copied into every worker with one identity), with a unique
`service.instance.id` (`<hostname>-<pid>`): workers that shared one would mix their cumulative
counters into one series. Metrics are pushed over OTLP/HTTP to the collector, configured with the
standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_METRIC_EXPORT_INTERVAL, ...), and
OTEL_SDK_DISABLED=true turns all of it off. An unreachable collector costs requests nothing: the
export runs on the reader's own thread, and cumulative aggregation keeps memory bounded.

Instruments (Prometheus names, after the collector's translation, in brackets):

* http.server.request.duration, s: FastAPI instrumentation, stable HTTP semantic conventions
  [http_server_request_duration_seconds]
* mnist.predictions: predictions by predicted digit and low confidence [mnist_predictions_total]
* mnist.prediction.confidence: confidence of each prediction [mnist_prediction_confidence]
* mnist.preprocess.duration, s: decoding and normalising one upload
* mnist.inference.duration, s: one batch through the model
* mnist.queue.wait, s: from enqueue to the start of the request's batch
* mnist.batch.size: images per inference call
* mnist.queue.depth: images waiting for inference in this worker (a gauge)
* mnist.rejected: requests refused, by reason (a bad input's kind, overloaded, not_ready)
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from app.inference.batcher import BatchRecord

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
    0.5,
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
        self.predictions = meter.create_counter(
            "mnist.predictions", unit="{prediction}", description="Predictions, by predicted digit."
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

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(source()) for source in self._depth_sources]

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_size.record(record.size)
        self.inference.record(record.inference_seconds)
        for wait in record.queue_waits:
            self.queue_wait.record(wait)

    def record_prediction(self, digit: int, confidence: float, low_confidence: bool) -> None:
        self.predictions.add(1, {"mnist.digit": digit, "mnist.low_confidence": low_confidence})
        self.confidence.record(confidence)

    def record_rejection(self, reason: str) -> None:
        self.rejected.add(1, {"mnist.reason": reason})


def instrument_http(app: Any, meter_provider: metrics.MeterProvider | None = None) -> None:
    """Standard HTTP server metrics for `app` (call before the app starts serving)."""
    # Stable HTTP semantic conventions: http.server.request.duration in seconds, instead of the
    # old http.server.duration in milliseconds. Read once, when the instrumentation loads.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        meter_provider=meter_provider,
        excluded_urls="healthz,readyz",
        # The per-message ASGI receive/send spans cost time and say nothing here.
        exclude_spans=["receive", "send"],
    )


def build_provider(service_version: str, readers: list[Any]) -> Any:
    """A MeterProvider with this worker's identity and the service's histogram views."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import (
        DropAggregation,
        ExplicitBucketHistogramAggregation,
        View,
    )
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "mnist-api"),
            "service.version": service_version,
            "service.instance.id": instance_id(),
            "host.name": socket.gethostname(),
        }
    )
    views = [
        View(
            instrument_name="http.server.request.duration",
            aggregation=ExplicitBucketHistogramAggregation(list(LATENCY_BUCKETS)),
        ),
        # The instrumentation's other HTTP instruments: unused by the dashboards and alerts.
        # Dropped, so that they make no series (the SDK still receives the measurements).
        *(
            View(instrument_name=name, aggregation=DropAggregation())
            for name in (
                "http.server.request.body.size",
                "http.server.response.body.size",
                "http.server.active_requests",
            )
        ),
    ]
    return MeterProvider(resource=resource, metric_readers=readers, views=views)


def start_provider(service_version: str) -> Callable[[], None]:
    """Install this worker's MeterProvider, exporting over OTLP; returns its shutdown, which
    flushes the last export."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    provider = build_provider(
        service_version, [PeriodicExportingMetricReader(OTLPMetricExporter())]
    )
    metrics.set_meter_provider(provider)
    log.info("metrics: OTLP export as %s", instance_id())

    def shutdown() -> None:
        try:
            provider.shutdown(timeout_millis=5000)
        except Exception:  # the collector may be gone; nothing to do about it now
            log.warning("metrics: final export failed", exc_info=True)

    return shutdown
