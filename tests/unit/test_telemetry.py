"""Metrics: the instruments, their units and bucket boundaries, recorded through the real app."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)

from app.config import Settings
from app.main import create_app
from app.telemetry import (
    FAST_BUCKETS,
    LATENCY_BUCKETS,
    METER_NAME,
    FastHistogram,
    HttpServerMetrics,
    Metrics,
    WithHistograms,
    build_provider,
    instance_id,
)
from tests.helpers import FakeModel, digit_image, png_bytes

# One MNIST digit as an upload, posted by every test that needs a prediction.
DIGIT = {"file": ("d.png", png_bytes(digit_image()), "image/png")}


def middleware_of(app: Any) -> list[Any]:
    return [m.cls for m in app.user_middleware]


def collect(reader: InMemoryMetricReader, client: TestClient | None = None) -> dict[str, Any]:
    """Every metric by name: what the SDK collected, with the app's own histograms (as its
    exporter adds them) when `client` is given."""
    data = reader.get_metrics_data()
    assert data is not None
    if client is not None:
        data = client.app.state.metrics.merged(data)  # type: ignore[attr-defined]
    found: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = (metric, resource_metrics.resource)
    return found


@pytest.fixture
def observed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, InMemoryMetricReader]]:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")  # the SDK honours it too
    reader = InMemoryMetricReader()
    provider = build_provider("test-1", [reader])
    app = create_app(settings, model_loader=lambda _s: FakeModel(), meter_provider=provider)
    assert HttpServerMetrics in middleware_of(app)
    with TestClient(app) as client:
        yield client, reader


def test_predictions_are_counted_by_digit(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    digits = [client.post("/predict", files=DIGIT).json()["digit"] for _ in range(7)]
    batch = [("files", (f"{i}.png", png_bytes(digit_image()), "image/png")) for i in range(3)]
    assert client.post("/predict/batch", files=batch).status_code == 200
    metrics = collect(reader, client)
    predictions, resource = metrics["mnist.predictions"]
    points = list(predictions.data.data_points)
    assert sum(p.value for p in points) == 10
    assert {p.attributes["mnist.digit"] for p in points} == set(digits)
    assert resource.attributes["service.name"] == "mnist-api"
    assert resource.attributes["service.version"] == "test-1"
    assert resource.attributes["service.instance.id"] == instance_id()
    confidence = metrics["mnist.prediction.confidence"][0].data.data_points[0]
    assert confidence.count == 10


def test_internals_are_measured_in_seconds(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    for _ in range(5):
        assert client.post("/predict", files=DIGIT).status_code == 200
    metrics = collect(reader, client)
    for name in ("mnist.preprocess.duration", "mnist.inference.duration", "mnist.queue.wait"):
        metric = metrics[name][0]
        assert metric.unit == "s"
        point = metric.data.data_points[0]
        assert point.count == 5
        assert 0 < point.sum < 5
    batch_size = metrics["mnist.batch.size"][0].data.data_points[0]
    assert batch_size.sum == 5
    depth = metrics["mnist.queue.depth"][0].data.data_points[0]
    assert depth.value == 0


def test_admission_is_measured_from_the_edges_stamp(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    client.app.state.admission.edge_clock.age(time.time())  # type: ignore[attr-defined]
    stamped = {"X-Request-Start": f"t={time.time() - 0.2:.3f}"}
    assert client.post("/predict", files=DIGIT, headers=stamped).status_code == 200
    assert client.post("/predict", files=DIGIT).status_code == 200  # no stamp: no edge wait
    metrics = collect(reader, client)
    edge, _ = metrics["mnist.edge.wait"]
    assert edge.unit == "s"
    (point,) = edge.data.data_points
    assert point.count == 1
    assert point.sum == pytest.approx(0.2, abs=0.05)
    wait, _ = metrics["mnist.admission.wait"]
    assert wait.unit == "s"
    (point,) = wait.data.data_points
    assert (point.count, point.sum) == (2, 0.0)  # a free place each time: no wait
    assert tuple(point.explicit_bounds) == LATENCY_BUCKETS
    states = {
        p.attributes["mnist.state"]: p.value
        for p in metrics["mnist.admission.requests"][0].data.data_points
    }
    assert states == {"active": 0, "waiting": 0}
    for name in ("mnist.admission.overloads", "mnist.admission.overload.requests"):
        assert [p.value for p in metrics[name][0].data.data_points] == [0], name


def test_overloads_are_exported_per_worker(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    admission = client.app.state.admission  # type: ignore[attr-defined]
    admission.overloads, admission.overload_arrivals = 3, 41
    metrics = collect(reader, client)
    (overloads,) = metrics["mnist.admission.overloads"][0].data.data_points
    (arrivals,) = metrics["mnist.admission.overload.requests"][0].data.data_points
    assert (overloads.value, arrivals.value) == (3, 41)


def test_admission_refusals_are_counted_by_reason(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    reader = InMemoryMetricReader()
    tight = settings.model_copy(update={"max_concurrency": 1, "max_queued": 0})
    app = create_app(
        tight, model_loader=lambda _s: FakeModel(), meter_provider=build_provider("t", [reader])
    )
    with TestClient(app) as client:
        app.state.admission.active = 1  # as if a prediction were being served
        response = client.post("/predict", files=DIGIT)
        app.state.admission.active = 0
    assert response.status_code == 503
    points = collect(reader)["mnist.rejected"][0].data.data_points
    assert {p.attributes["mnist.reason"]: p.value for p in points} == {"queue_full": 1}


def test_http_duration_uses_stable_conventions_and_millisecond_buckets(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    assert client.post("/predict", files=DIGIT).status_code == 200
    client.get("/healthz")  # excluded: health checks would drown the latency figures
    found = collect(reader, client)
    for unused in (
        "http.server.request.body.size",
        "http.server.response.body.size",
        "http.server.active_requests",
    ):
        assert unused not in found  # not recorded: no series
    metric = found["http.server.request.duration"][0]
    assert metric.unit == "s"
    (point,) = metric.data.data_points
    assert tuple(point.explicit_bounds) == LATENCY_BUCKETS
    assert point.explicit_bounds[0] <= 0.001  # a ~1 ms service needs sub-ms resolution
    assert dict(point.attributes) == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "http.route": "/predict",
        "http.response.status_code": 200,
    }
    assert point.count == 1


def test_http_errors_and_odd_methods_are_labelled_per_the_conventions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5xx and exceptions carry error.type; a made-up method is _OTHER, not a new series."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    histogram = FastHistogram("d", "s", "", LATENCY_BUCKETS, enabled=True)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        status = 503 if scope["path"] == "/busy" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = HttpServerMetrics(app, histogram)
    client = TestClient(middleware, raise_server_exceptions=False)
    client.get("/busy")
    for n in range(2):
        client.request(f"BREW{n}", "/nowhere")
    client.get("/boom")
    client.get("/healthz")  # excluded
    metric = histogram.metric(0, 1)
    assert metric is not None
    points = [p for p in metric.data.data_points if isinstance(p, HistogramDataPoint)]
    found = {
        (
            p.attributes["http.request.method"],
            p.attributes.get("http.response.status_code"),
            p.attributes.get("error.type"),
        ): p.count
        for p in points
        if p.attributes is not None
    }
    assert found == {
        ("GET", 503, "503"): 1,
        ("_OTHER", 404, None): 2,
        ("GET", 500, "RuntimeError"): 1,
    }
    assert len(middleware._attributes) == 3  # the two made-up methods share one entry


def test_rejections_are_counted_by_reason(
    observed: tuple[TestClient, InMemoryMetricReader],
) -> None:
    client, reader = observed
    client.post("/predict", files={"file": ("x.png", b"", "image/png")})
    client.post("/predict", files={"file": ("x.txt", b"text", "text/plain")})
    client.post("/predict", files={"file": ("x.txt", b"text", "text/plain")})
    client.post("/predict", json={"file": "x"})
    points = collect(reader)["mnist.rejected"][0].data.data_points
    reasons = {p.attributes["mnist.reason"]: p.value for p in points}
    assert reasons == {"empty": 1, "unsupported": 2, "unsupported_content_type": 1}


def test_disabled_sdk_adds_no_instrumentation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    app = create_app(settings, model_loader=lambda _s: FakeModel())
    assert HttpServerMetrics not in middleware_of(app)
    with TestClient(app) as client:
        assert client.post("/predict", files=DIGIT).status_code == 200


NATIVE_CHECK = """
from opentelemetry import metrics
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from fastapi.testclient import TestClient
import app.main
from app.config import Settings
from app.telemetry import build_provider
from tests.helpers import FakeModel, digit_image, png_bytes

reader = InMemoryMetricReader()
metrics.set_meter_provider(build_provider("test-1", [reader]))
# The global provider above stands in for the worker's own.
app.main.start_provider = lambda version, metrics: None
application = app.main.create_app(Settings(), model_loader=lambda _s: FakeModel())
with TestClient(application) as client:
    upload = {"file": ("d.png", png_bytes(digit_image()), "image/png")}
    assert client.post("/predict", files=upload).status_code == 200
# What the worker exports: the SDK's metrics (FastAPI's would be there) and the app's own.
exported = application.state.metrics.merged(reader.get_metrics_data())
for resource_metrics in exported.resource_metrics:
    for scope in resource_metrics.scope_metrics:
        for metric in scope.metrics:
            if metric.name.startswith("http."):
                print(scope.scope.name, metric.name)
"""


def test_fastapi_native_metrics_stay_off() -> None:
    """FastAPI >= 0.16x records HTTP metrics of its own once a global MeterProvider exists
    (as in every worker): they must stay off, or http.server.request.duration is recorded
    twice. In a child process: a global provider cannot be unset."""
    result = subprocess.run(
        [sys.executable, "-c", NATIVE_CHECK],
        env={**os.environ, "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "none"},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == ["mnist http.server.request.duration"]


def test_the_apps_own_histograms_aggregate_as_the_sdks_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    values = [0.0, 0.00005, 0.0001, 0.00042, 0.003, 0.003, 0.2, 7.5, 1e-7, 0.05]
    reader = InMemoryMetricReader()
    sdk = (
        build_provider("t", [reader])
        .get_meter("t")
        .create_histogram("h", unit="s", explicit_bucket_boundaries_advisory=list(FAST_BUCKETS))
    )
    ours = FastHistogram("h", "s", "", FAST_BUCKETS, enabled=True)
    assert ours.metric(0, 1) is None  # nothing recorded: nothing exported
    for value in values:
        sdk.record(value)
        ours.record(value)
    (expected,) = collect(reader)["h"][0].data.data_points
    assert isinstance(expected, HistogramDataPoint)
    metric = ours.metric(0, 1)
    assert metric is not None
    (point,) = metric.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert list(point.bucket_counts) == list(expected.bucket_counts)
    assert tuple(point.explicit_bounds) == tuple(expected.explicit_bounds)
    assert (point.count, point.min, point.max) == (expected.count, expected.min, expected.max)
    assert point.sum == pytest.approx(expected.sum)
    off = FastHistogram("h", "s", "", FAST_BUCKETS, enabled=False)
    off.record(1.0)
    assert off.metric(0, 1) is None


class Captured(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> Any:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def test_the_exporter_sends_the_apps_histograms_with_the_sdks_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    metrics = Metrics(MeterProvider(), enabled=True)
    inner = Captured()
    exporter = WithHistograms(inner, metrics)
    provider = build_provider("t", [PeriodicExportingMetricReader(exporter, math.inf)])
    provider.get_meter(METER_NAME).create_counter("c").add(1)
    metrics.queue_wait.record(0.001)
    provider.force_flush()
    (data,) = inner.exported
    (scope,) = data.resource_metrics[0].scope_metrics
    assert scope.scope.name == METER_NAME
    assert sorted(m.name for m in scope.metrics) == ["c", "mnist.queue.wait"]
    assert data.resource_metrics[0].resource.attributes["service.version"] == "t"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    with pytest.raises(ValueError, match="only cumulative"):
        WithHistograms(Captured(), metrics)


def test_a_worker_says_it_is_stopping_in_its_last_export(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    reader = InMemoryMetricReader()
    app = create_app(
        settings, model_loader=lambda _s: FakeModel(), meter_provider=build_provider("t", [reader])
    )

    def stopping() -> list[int]:
        return [int(p.value) for p in collect(reader)["mnist.worker.stopping"][0].data.data_points]

    with TestClient(app):
        assert stopping() == [0]
    assert stopping() == [1]  # after the lifespan's shutdown (gunicorn's graceful stop)
