"""The ASGI application: `app.main:app`, run by gunicorn (see app/gunicorn.conf.py).

The model is loaded in the lifespan, in each worker after gunicorn forks it: never at import
time, where it would be loaded in the master and shared, with its threads, by forked workers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.metrics import MeterProvider

from app.admission import Admission, AdmissionMiddleware
from app.api import errors
from app.api.middleware import BodySizeLimitMiddleware, ServedByMiddleware
from app.api.routes import health, predict
from app.classifier import Classifier, Normalize
from app.config import Settings, from_environment
from app.inference.runtime import Model, load_model
from app.preprocessing import normalize_digit
from app.telemetry import (
    HttpServerMetrics,
    Metrics,
    sdk_disabled,
    start_provider,
    worker_resource,
)
from app.tracing import Tracing, start_tracer, tracing_off

log = logging.getLogger(__name__)

ModelLoader = Callable[[Settings], Model]


def create_app(
    settings: Settings | None = None,
    model_loader: ModelLoader = load_model,
    meter_provider: MeterProvider | None = None,
    normalize: Normalize = normalize_digit,
) -> FastAPI:
    """The application. `meter_provider` replaces the OTLP-exporting one (tests); `normalize`
    the MNIST preprocessing (a baseline that measures the service without it)."""
    settings = settings or from_environment()
    telemetry_off = sdk_disabled() and meter_provider is None
    start_global_provider = not telemetry_off and meter_provider is None
    metrics = Metrics(meter_provider, enabled=not telemetry_off)
    trace_slot = Tracing()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A model that cannot be loaded or warmed up fails the worker's start-up: gunicorn
        # then exits with the reason in its log instead of serving errors.
        model = await asyncio.to_thread(model_loader, settings)
        # This worker's own MeterProvider and TracerProvider, made here, after gunicorn's fork.
        traced = start_global_provider and not tracing_off()
        stop_metrics = (
            start_provider(model.info.version, metrics) if start_global_provider else None
        )
        stop_traces = None
        if traced:
            resource = worker_resource(model.info.version)
            trace_slot.tracer, stop_traces = start_tracer(resource, settings)
        classifier = Classifier(settings, model, metrics, normalize)
        metrics.watch_queue(lambda: classifier.batcher.depth)
        await classifier.start()
        app.state.classifier = classifier
        # What exists now (modules, the app, the model, the telemetry) lives as long as the
        # worker: out of the cyclic collector's sight from here on. Under load, requests that
        # wait outlive the young generations and set off full collections; each would
        # otherwise traverse all of it, stalling the event loop (docs/design.md).
        gc.collect()
        gc.freeze()
        log.info("ready: model %s on %s", model.info.version, model.info.runtime)
        try:
            yield
        finally:
            gc.unfreeze()
            metrics.stopping = True  # in the final export below
            await classifier.stop()
            trace_slot.tracer = None
            if stop_traces is not None:
                stop_traces()
            if stop_metrics is not None:
                stop_metrics()

    app = FastAPI(
        title="MNIST digit classifier",
        version="1.0.0",
        description="Classifies an image of one handwritten digit. Upload it as multipart "
        "field `file` to `POST /predict`.",
        lifespan=lifespan,
        form_limits={"max_files": settings.max_batch_files, "max_fields": 16},
        # FastAPI's own OpenTelemetry support stays off: HttpServerMetrics records the HTTP
        # metrics and the request's trace (at a fraction of its cost).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.classifier = None
    app.state.metrics = metrics
    app.state.tracing = trace_slot
    app.include_router(predict.router)
    app.include_router(health.router)
    errors.install(app)
    # Added in this order, each outside the last: admission decides first (before anything
    # reads the body), then an oversized body is refused before anything reads it; every
    # answer, a refusal too, names the worker.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    admission = Admission(
        budget=settings.latency_budget_ms / 1000.0,
        max_concurrency=settings.max_concurrency,
        max_queued=settings.max_queued,
    )
    app.state.admission = admission
    metrics.watch_admission(admission)
    app.add_middleware(
        AdmissionMiddleware,
        admission=admission,
        on_admit=metrics.record_admission,
        on_refuse=metrics.record_rejection,
    )
    app.add_middleware(ServedByMiddleware)
    if not telemetry_off:
        # Outermost: every answer is timed and counted, refusals included.
        app.add_middleware(HttpServerMetrics, histogram=metrics.http_duration, tracing=trace_slot)
    return app


def __getattr__(name: str) -> FastAPI:
    # `app.main:app` is created on first access, in the process that serves it: importing this
    # module (tests, tools) reads no settings and loads nothing.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
