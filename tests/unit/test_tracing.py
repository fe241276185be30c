"""Traces: which requests' traces are kept, the spans a kept one holds, its exemplar and its log
lines, recorded through the real app with a fake model and an in-memory span exporter."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from app import tracing
from app.config import Settings
from app.logs import JsonFormatter
from app.main import create_app
from app.telemetry import build_provider, worker_resource
from app.tracing import (
    DEFAULT_RATIO,
    RequestTrace,
    TokenBucket,
    Tracer,
    begin,
    parse_traceparent,
    start_tracer,
    tracing_off,
)
from tests.helpers import FakeModel, digit_image, png_bytes

DIGIT = {"file": ("d.png", png_bytes(digit_image()), "image/png")}
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


def traceparent(sampled: bool, trace_id: int = TRACE_ID, parent: int = CLIENT_SPAN) -> str:
    return f"00-{trace_id:032x}-{parent:016x}-{'01' if sampled else '00'}"


def test_traceparent_is_parsed_per_the_w3c_format() -> None:
    assert parse_traceparent(traceparent(True).encode()) == (TRACE_ID, CLIENT_SPAN, True)
    assert parse_traceparent(traceparent(False).encode()) == (TRACE_ID, CLIENT_SPAN, False)
    assert parse_traceparent(b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01") is None  # zero trace
    assert parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01") is None
    assert parse_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") is None
    assert parse_traceparent(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01") is None
    assert parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7") is None
    assert parse_traceparent(b"") is None
    accented = "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01".encode()
    assert parse_traceparent(accented) is None


def test_a_context_made_by_the_edge_has_no_recorded_parent() -> None:
    edge = f"00-{TRACE_ID:032x}-{TRACE_ID >> 64:016x}-01".encode()
    made = begin([(b"traceparent", edge), (b"x-trace-origin", b"edge")])
    assert (made.trace_id, made.parent_id, made.sampled) == (TRACE_ID, 0, True)
    # Only the edge's header says so: the same context without it is a client's.
    forged = begin([(b"traceparent", edge)])
    assert (forged.trace_id, forged.parent_id) == (TRACE_ID, TRACE_ID >> 64)
    assert begin([(b"x-trace-origin", b"edge")]).trace_id != TRACE_ID
    client = begin([(b"traceparent", traceparent(False).encode())])
    assert (client.trace_id, client.parent_id, client.sampled) == (TRACE_ID, CLIENT_SPAN, False)
    fresh = begin([(b"traceparent", b"garbage")])
    assert fresh.trace_id not in (0, TRACE_ID)
    assert fresh.parent_id == 0
    assert fresh.sampled is None
    assert begin([]).span_id != begin([]).span_id


def test_the_token_bucket_bounds_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2, 2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    assert [bucket.take(), bucket.take()] == [True, False]


class Traced:
    def __init__(self, client: TestClient, exporter: InMemorySpanExporter, reader: Any) -> None:
        self.client, self.exporter, self.reader = client, exporter, reader

    def post(self, headers: dict[str, str] | None = None, **kwargs: Any) -> int:
        kwargs.setdefault("files", DIGIT)
        return self.client.post("/predict", headers=headers or {}, **kwargs).status_code

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


class BreakableModel(FakeModel):
    broken = False  # set once the app has started (its warm-up runs the model)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self.broken:
            raise RuntimeError("the model broke")
        return super().predict(batch)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def traced(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, model: FakeModel
) -> Iterator[Traced]:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    reader = InMemoryMetricReader()
    app = create_app(
        settings,
        model_loader=lambda _s: model,
        meter_provider=build_provider("test-1", [reader]),
    )
    exporter = InMemorySpanExporter()
    with TestClient(app) as client:
        app.state.tracing.tracer = Tracer(
            SimpleSpanProcessor(exporter),
            ParentBased(TraceIdRatioBased(0.0)),  # nothing sampled without a sampled parent
            worker_resource("test-1"),
            slow_seconds=60.0,
            kept_per_second=1000.0,
        )
        yield Traced(client, exporter, reader)


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_a_sampled_request_has_one_trace_from_its_parent_to_the_batch(traced: Traced) -> None:
    assert traced.post({"traceparent": traceparent(True)}) == 200
    assert len(traced.spans()) == 6
    spans = by_name(traced.spans())
    assert set(spans) == {
        "POST /predict",
        "mnist.admission.wait",
        "mnist.decode",
        "mnist.preprocess",
        "mnist.queue.wait",
        "mnist.inference",
    }
    server = spans["POST /predict"]
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None
    assert server.parent.span_id == CLIENT_SPAN
    assert server.status.status_code == StatusCode.UNSET
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/predict"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/predict"
    assert server.attributes["mnist.trace.kept"] == "sampled"
    assert server.resource.attributes["service.name"] == "mnist-api"
    assert server.start_time is not None
    assert server.end_time is not None
    for name, span in spans.items():
        assert span.context is not None
        assert span.context.trace_id == TRACE_ID
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
        if name != "POST /predict":
            assert span.parent is not None
            assert span.parent.span_id == server.context.span_id
            # Within the request (the clocks are converted, not read twice).
            assert server.start_time <= span.start_time
            assert span.end_time <= server.end_time
    order = ["mnist.admission.wait", "mnist.decode", "mnist.preprocess", "mnist.queue.wait"]
    starts = [spans[name].start_time or 0 for name in order]
    assert starts == sorted(starts)
    inference = spans["mnist.inference"]
    assert inference.attributes is not None
    assert inference.attributes["mnist.batch.size"] == 1
    assert spans["mnist.decode"].attributes == {"mnist.image.format": "PNG"}


def test_an_unsampled_request_leaves_no_trace_unless_it_failed_or_was_slow(
    traced: Traced,
) -> None:
    assert traced.post({"traceparent": traceparent(False)}) == 200
    assert traced.post() == 200  # no parent: the sampler's ratio (0 here)
    assert traced.spans() == []

    # A failed one (415: not an image) is kept, with the status of a client error.
    assert traced.post(files={"file": ("x.txt", b"not an image", "text/plain")}) == 415
    (server,) = [s for s in traced.spans() if s.kind == SpanKind.SERVER]
    assert server.attributes is not None
    assert server.attributes["mnist.trace.kept"] == "failed"
    assert server.attributes["http.response.status_code"] == 415
    assert server.status.status_code == StatusCode.UNSET  # 4xx is the client's, not an error
    assert server.parent is None

    # A slow one is kept.
    traced.exporter.clear()
    tracer = traced.client.app.state.tracing.tracer  # type: ignore[attr-defined]
    tracer.slow_seconds = 0.0
    assert traced.post({"traceparent": traceparent(False)}) == 200
    kept = by_name(traced.spans())
    assert kept["POST /predict"].attributes["mnist.trace.kept"] == "slow"  # type: ignore[index]


def test_an_error_is_kept_with_an_error_status(traced: Traced) -> None:
    classifier = traced.client.app.state.classifier  # type: ignore[attr-defined]

    def broken(batch: Any) -> Any:
        raise RuntimeError("the model broke")

    classifier.batcher._predict = broken
    assert traced.post({"traceparent": traceparent(False)}) == 500
    server = by_name(traced.spans())["POST /predict"]
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["mnist.trace.kept"] == "failed"


def test_kept_failures_and_client_sampled_traces_are_bounded(traced: Traced) -> None:
    tracer = traced.client.app.state.tracing.tracer  # type: ignore[attr-defined]
    tracer.rescues = TokenBucket(1, 3, clock=lambda: 0.0)  # time stands still: no refill

    def servers() -> int:
        return len([s for s in traced.spans() if s.kind == SpanKind.SERVER])

    bad = {"file": ("x.txt", b"not an image", "text/plain")}
    assert [traced.post(files=bad) for _ in range(10)] == [415] * 10
    assert servers() == 3  # the burst
    # A client that marks its request sampled draws on the same bound: nothing left.
    assert traced.post({"traceparent": traceparent(True)}) == 200
    assert servers() == 3
    # Nor one that dresses its context up as the edge's, without the edge's header.
    edge = traceparent(True, parent=TRACE_ID >> 64)
    assert traced.post({"traceparent": edge}) == 200
    assert servers() == 3
    # A trace the edge sampled is kept whatever the bound (the ratio bounds it).
    assert traced.post({"traceparent": edge, "x-trace-origin": "edge"}) == 200
    assert servers() == 4
    # No rescues at all when the rate is 0.
    assert not TokenBucket(0, 0).take()


def test_a_request_with_several_images_has_each_batch_once(traced: Traced) -> None:
    files = [("files", (f"{i}.png", png_bytes(digit_image()), "image/png")) for i in range(3)]
    response = traced.client.post(
        "/predict/batch", files=files, headers={"traceparent": traceparent(True)}
    )
    assert response.status_code == 200
    names = sorted(span.name for span in traced.spans())
    assert names.count("mnist.decode") == names.count("mnist.preprocess") == 3
    batches = [s for s in traced.spans() if s.name == "mnist.inference"]
    assert len(batches) == names.count("mnist.queue.wait") >= 1
    assert len({s.attributes["mnist.batch.number"] for s in batches if s.attributes}) == len(
        batches
    )


def test_the_latency_exemplar_names_the_kept_trace(traced: Traced) -> None:
    assert traced.post({"traceparent": traceparent(True)}) == 200
    assert traced.post({"traceparent": traceparent(False, trace_id=TRACE_ID + 1)}) == 200
    data = traced.reader.get_metrics_data()
    assert data is not None
    data = traced.client.app.state.metrics.merged(data)  # type: ignore[attr-defined]
    exemplars = [
        exemplar
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        if metric.name == "http.server.request.duration"
        for point in metric.data.data_points
        for exemplar in point.exemplars
    ]
    server = by_name(traced.spans())["POST /predict"]
    assert [(e.trace_id, e.span_id) for e in exemplars] == [(TRACE_ID, server.context.span_id)]


def test_log_lines_are_json_with_the_requests_trace() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        trace = RequestTrace(TRACE_ID, 0, True)
        token = tracing.CURRENT.set(trace)
        try:
            logger.error("inside %d", 7)
        finally:
            tracing.CURRENT.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "trace_id" not in outside
    assert outside["level"] == "warning"
    assert inside["message"] == "inside 7"
    assert inside["trace_id"] == f"{TRACE_ID:032x}"
    assert inside["span_id"] == f"{trace.span_id:016x}"


def test_the_default_sampler_is_a_ratio_not_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    exporter = SimpleSpanProcessor(InMemorySpanExporter())
    tracer, shutdown = start_tracer(worker_resource("t"), Settings(), exporter)
    assert f"TraceIdRatioBased{{{DEFAULT_RATIO}}}" in tracer.sampler.get_description()
    shutdown()
    # The standard variables, when set, decide.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    tracer, shutdown = start_tracer(
        worker_resource("t"), Settings(), SimpleSpanProcessor(exporter.span_exporter)
    )
    assert tracer.sampler.get_description().startswith("ParentBased{root:AlwaysOffSampler")
    shutdown()


def test_an_exporter_the_service_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    for value, off in (("", False), ("otlp", False), ("none", True), (" NONE ", True)):
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
        assert tracing_off() is off
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        tracing_off()


@pytest.mark.parametrize("model", [BreakableModel()])
def test_a_failed_batch_is_in_its_requests_traces_as_an_error(
    traced: Traced, model: BreakableModel
) -> None:
    model.broken = True
    assert traced.post() == 500
    spans = by_name(traced.spans())
    assert {"POST /predict", "mnist.queue.wait", "mnist.inference"} <= set(spans)
    inference = spans["mnist.inference"]
    assert inference.status.status_code == StatusCode.ERROR
    assert inference.attributes is not None
    assert inference.attributes["error.type"] == "RuntimeError"
    assert spans["mnist.queue.wait"].status.status_code == StatusCode.UNSET
    assert spans["POST /predict"].attributes["mnist.trace.kept"] == "failed"  # type: ignore[index]
