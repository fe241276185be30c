"""OpenTelemetry traces: one per request, from the edge to the model.

What a kept trace holds (docs/design.md#traces):

* `POST /predict` (server): the worker's whole handling, with the stable HTTP semantic
  conventions' attributes; its parent is the client's span when the client sent a
  `traceparent`, and none when the edge (nginx) started the trace.
* `mnist.admission.wait`, `mnist.decode`, `mnist.preprocess`, `mnist.queue.wait` and
  `mnist.inference` (internal), children of the server span. One inference batch serves many
  requests: each request's trace has its own `mnist.inference` span over the batch's run, with
  the batch's number and size, so a trace alone tells where its request's time went. A batch
  whose inference failed is there too, with `error.type` and an error status.

Every request records only timestamps on its way (a few tuple appends); the spans are built
when it ends, and only for the requests kept:

* head-sampled ones: by the SDK's sampler (OTEL_TRACES_SAMPLER, default parent-based with
  ratio OTEL_TRACES_SAMPLER_ARG), which follows the edge's decision, or a client's sampled flag;
* failed (4xx, 5xx, an exception) or slow (TRACES_SLOW_MS) ones, sampled or not.
Those sampled on a client's say and the failed or slow ones together: at most
TRACES_KEPT_PER_SECOND per worker, so that neither a flood of refusals nor a client that marks
every request sampled turns into a flood of spans. The Collector's tail sampling keeps the same
kinds whole.

The edge makes a `traceparent` for a request that has none: trace id = nginx's `$request_id`,
sampled by the same ratio (nginx/nginx.conf.template), and says so in `X-Trace-Origin: edge`,
a header only nginx sets. Such a parent names no recorded span, so the server span becomes the
trace's root, and its sampled flag is the ratio's, not a client's.

Built in each worker after the fork, like the MeterProvider; OTEL_TRACES_EXPORTER=none or
OTEL_SDK_DISABLED=true turns tracing off. Export is the SDK's BatchSpanProcessor (its own
thread, a bounded queue: OTEL_BSP_*), so a Collector that is down costs requests nothing.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.sampling import Sampler

    from app.config import Settings

log = logging.getLogger(__name__)

TRACEPARENT = b"traceparent"
# Set by nginx alone ("edge" when it made the request's traceparent; a client's is dropped).
TRACE_ORIGIN = b"x-trace-origin"
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_HEX = frozenset(b"0123456789abcdef")
# Ids from the `random` module's own generator, as the SDK's RandomIdGenerator: it is reseeded
# in every forked worker (a Random() made before the fork would give every worker the same ids).
_bits = random.getrandbits


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C `traceparent` of version 00, or None when
    it is not a valid one (https://www.w3.org/TR/trace-context/#traceparent-header)."""
    if len(value) != 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    if value[:2] != b"00" or not _HEX.issuperset(value[3:35] + value[36:52] + value[53:]):
        return None
    trace_id = int(value[3:35], 16)
    parent_id = int(value[36:52], 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, bool(int(value[53:], 16) & 0x01)


Attributes = Mapping[str, Any]


class RequestTrace:
    """One request's trace context and the timestamps of its steps (`time.perf_counter`)."""

    __slots__ = ("parent_id", "sampled", "span_id", "start", "steps", "trace_id", "wall")

    def __init__(self, trace_id: int, parent_id: int, sampled: bool | None) -> None:
        self.trace_id = trace_id
        self.span_id = _bits(64) or 1
        # 0: none recorded (the request had no traceparent, or the edge made it).
        self.parent_id = parent_id
        self.sampled = sampled  # the parent's flag; None without a parent
        self.wall = time.time_ns()
        self.start = time.perf_counter()
        self.steps: list[tuple[str, float, float, Attributes | None]] = []

    def step(
        self, name: str, start: float, end: float, attributes: Attributes | None = None
    ) -> None:
        self.steps.append((name, start, end, attributes))

    def ns(self, moment: float) -> int:
        """A perf_counter moment of this request as epoch nanoseconds."""
        return self.wall + int((moment - self.start) * 1e9)


class Tracing:
    """Where the worker's Tracer is found once its lifespan has made it (None: tracing off)."""

    def __init__(self) -> None:
        self.tracer: Tracer | None = None


CURRENT: ContextVar[RequestTrace | None] = ContextVar("mnist_request_trace", default=None)


def current() -> RequestTrace | None:
    return CURRENT.get()


def begin(headers: list[tuple[bytes, bytes]]) -> RequestTrace:
    """The trace of a request with these (ASGI) headers: its parent's, or a new one."""
    parsed = None
    edge = False
    for name, value in headers:
        if name == TRACEPARENT:
            parsed = parse_traceparent(value)
        elif name == TRACE_ORIGIN:
            edge = value == b"edge"
    if parsed is None:
        return RequestTrace(_bits(128) or 1, 0, None)
    trace_id, parent_id, sampled = parsed
    # Made by the edge: its parent is no recorded span, and its sampled flag is the edge's ratio.
    return RequestTrace(trace_id, 0 if edge else parent_id, sampled)


class TokenBucket:
    """At most `rate` events a second, `burst` at once."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


# The share of requests traced when nothing says otherwise (docs/design.md#traces).
DEFAULT_RATIO = 0.02
_RECORDED = frozenset((Decision.RECORD_AND_SAMPLE,))
KEPT = "mnist.trace.kept"  # why a trace was kept: sampled, failed or slow
# A step that failed says why in this attribute (semantic conventions) and has an error status.
ERROR_TYPE = "error.type"


class Tracer:
    """Decides which requests' traces are kept and builds their spans."""

    def __init__(
        self,
        processor: SpanProcessor,
        sampler: Sampler,
        resource: Any,
        *,
        slow_seconds: float,
        kept_per_second: float,
    ) -> None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.processor = processor
        self.sampler = sampler
        self.resource = resource
        self.slow_seconds = slow_seconds
        self.rescues = TokenBucket(
            kept_per_second, max(1.0, kept_per_second) if kept_per_second else 0.0
        )
        self.scope = InstrumentationScope("mnist")

    def why_kept(
        self, trace: RequestTrace, name: str, status: int, error: bool, seconds: float
    ) -> str | None:
        sampled = self._head_sampled(trace, name)
        if sampled and not trace.parent_id:
            return "sampled"  # decided here or at the edge: bounded by the ratio
        failed = error or status >= 400
        slow = seconds >= self.slow_seconds
        # A client's sampled flag is a request from outside: bounded like the rescues, so
        # that no client can make every request pay for a trace.
        if (sampled or failed or slow) and self.rescues.take():
            return "sampled" if sampled else "failed" if failed else "slow"
        return None

    def _head_sampled(self, trace: RequestTrace, name: str) -> bool:
        parent: Context | None = None
        if trace.sampled is not None:
            remote = SpanContext(
                trace.trace_id,
                trace.parent_id or trace.trace_id >> 64,
                is_remote=True,
                trace_flags=SAMPLED if trace.sampled else TraceFlags(0),
            )
            parent = trace_api.set_span_in_context(trace_api.NonRecordingSpan(remote))
        result = self.sampler.should_sample(parent, trace.trace_id, name, SpanKind.SERVER)
        return result.decision in _RECORDED

    def finish(
        self,
        trace: RequestTrace,
        name: str,
        attributes: Attributes,
        path: str,
        status: int,
        error: str | None,
        end: float,
    ) -> bool:
        """Emit the request's spans if it is kept (its server span: `name`, `attributes` and
        `url.path`); returns whether it was."""
        reason = self.why_kept(trace, name, status, error is not None, end - trace.start)
        if reason is None:
            return False
        from opentelemetry.sdk.trace import ReadableSpan

        server = SpanContext(trace.trace_id, trace.span_id, is_remote=False, trace_flags=SAMPLED)
        parent = (
            SpanContext(trace.trace_id, trace.parent_id, is_remote=True, trace_flags=SAMPLED)
            if trace.parent_id
            else None
        )
        failed = error is not None or status >= 500  # 4xx is the client's: no error status
        spans = [
            ReadableSpan(
                name,
                context=server,
                parent=parent,
                resource=self.resource,
                attributes={**attributes, "url.path": path, KEPT: reason},
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET),
                start_time=trace.wall,
                end_time=trace.ns(end),
                instrumentation_scope=self.scope,
            )
        ]
        for step_name, start, step_end, step_attributes in trace.steps:
            context = SpanContext(
                trace.trace_id, _bits(64) or 1, is_remote=False, trace_flags=SAMPLED
            )
            spans.append(
                ReadableSpan(
                    step_name,
                    context=context,
                    parent=server,
                    resource=self.resource,
                    attributes=step_attributes,
                    kind=SpanKind.INTERNAL,
                    status=Status(StatusCode.ERROR)
                    if step_attributes and ERROR_TYPE in step_attributes
                    else Status(StatusCode.UNSET),
                    start_time=trace.ns(start),
                    end_time=trace.ns(step_end),
                    instrumentation_scope=self.scope,
                )
            )
        for span in spans:
            self.processor.on_end(span)
        return True


def _ratio(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else float(default)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def tracing_off() -> bool:
    """OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none; raises for an exporter this
    service does not have (only OTLP/HTTP)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: this service exports otlp or none")
    return exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def start_tracer(
    resource: Any, settings: Settings, processor: SpanProcessor | None = None
) -> tuple[Tracer, Callable[[], None]]:
    """This worker's TracerProvider (global, for any library that makes spans) and the Tracer
    of its requests, exporting over OTLP/HTTP unless given `processor`; returns the Tracer and
    the provider's shutdown, which flushes what is queued."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    # OTEL_TRACES_SAMPLER when set; else parent-based with a ratio (OTEL_TRACES_SAMPLER_ARG, by
    # default DEFAULT_RATIO), not the SDK's default of sampling every request.
    sampler = None
    if not os.environ.get("OTEL_TRACES_SAMPLER", "").strip():
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        ratio = _ratio("OTEL_TRACES_SAMPLER_ARG", DEFAULT_RATIO)
        sampler = ParentBased(TraceIdRatioBased(min(ratio, 1.0)))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(processor)
    trace_api.set_tracer_provider(provider)
    tracer = Tracer(
        processor,
        provider.sampler,
        provider.resource,
        slow_seconds=settings.traces_slow_ms / 1000.0,
        kept_per_second=settings.traces_kept_per_second,
    )
    log.info("traces: OTLP export, sampler %s", provider.sampler.get_description())

    def shutdown() -> None:
        try:
            provider.shutdown()
        except Exception:  # the collector may be gone; nothing to do about it now
            log.warning("traces: final export failed", exc_info=True)

    return tracer, shutdown
