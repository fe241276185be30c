"""Traces through the real stack: nginx -> replicas -> Collector (tail sampling) -> Jaeger, and
the latency histogram's exemplars in Prometheus naming traces that Jaeger returns."""

from __future__ import annotations

import io
import json
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import yaml
from PIL import Image

from harness.memory import memory_sample
from tests.helpers import digit_image
from tests.integration.stack import (
    DIGIT_BODY,
    DIGIT_TYPE,
    REPLICAS,
    REPO,
    Load,
    Stack,
    wait_for,
)

JAEGER_PORT = 16687  # the test stack's (conftest's engine_env)
STEPS = {
    "mnist.admission.wait",
    "mnist.decode",
    "mnist.preprocess",
    "mnist.queue.wait",
    "mnist.inference",
}
# From a worker's export (every 5 s), through the tail sampler's decision wait (5 s) and the
# Collector's batch (1 s), to Jaeger.
ARRIVAL = 60.0


def trace(trace_id: str) -> dict[str, Any] | None:
    """Jaeger's answer for one trace, or None while it has none."""
    url = f"http://127.0.0.1:{JAEGER_PORT}/api/traces/{trace_id}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            found: list[dict[str, Any]] = json.load(response)["data"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return found[0] if found else None


def new_trace_id() -> str:
    return secrets.token_hex(16)


def post(stack: Stack, headers: dict[str, str] | None = None, body: bytes = DIGIT_BODY) -> Any:
    status, response_headers, _ = stack.request(
        "POST", "/predict", body, {"Content-Type": DIGIT_TYPE, **(headers or {})}
    )
    return status, response_headers


def spans_by_name(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {span["operationName"]: span for span in found["spans"]}


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def test_a_sampled_request_is_one_trace_from_the_client_to_the_batch(stack: Stack) -> None:
    stack.ensure_replicas(REPLICAS)
    trace_id, parent = new_trace_id(), secrets.token_hex(8)
    status, headers = post(stack, {"traceparent": f"00-{trace_id}-{parent}-01"})
    assert status == 200
    assert headers["x-trace-id"] == trace_id  # the client's trace, passed on
    found = wait_for(lambda: trace(trace_id), timeout=ARRIVAL, what="the trace in Jaeger")
    spans = spans_by_name(found)
    assert set(spans) == {"POST /predict", *STEPS}, set(spans)
    server = spans["POST /predict"]
    assert [(r["refType"], r["spanID"]) for r in server["references"]] == [("CHILD_OF", parent)]
    assert tags(server)["http.response.status_code"] == 200
    assert tags(server)["http.route"] == "/predict"
    assert tags(server)["span.kind"] == "server"
    for name in STEPS:
        references = spans[name]["references"]
        assert [(r["refType"], r["spanID"]) for r in references] == [("CHILD_OF", server["spanID"])]
        assert server["startTime"] <= spans[name]["startTime"]
    assert found["processes"][server["processID"]]["serviceName"] == "mnist-api"
    assert tags(spans["mnist.inference"])["mnist.batch.size"] >= 1


def test_a_client_cannot_pass_its_context_off_as_the_edges(stack: Stack) -> None:
    """The replicas take a context for the edge's only on nginx's X-Trace-Origin, which a
    client cannot send through: a client's context shaped like the edge's keeps its parent."""
    trace_id = new_trace_id()
    forged = f"00-{trace_id}-{trace_id[:16]}-01"
    status, headers = post(stack, {"traceparent": forged, "X-Trace-Origin": "edge"})
    assert status == 200
    assert headers["x-trace-id"] == trace_id
    found = wait_for(lambda: trace(trace_id), timeout=ARRIVAL, what="the client's trace")
    server = spans_by_name(found)["POST /predict"]
    assert [(r["refType"], r["spanID"]) for r in server["references"]] == [
        ("CHILD_OF", trace_id[:16])
    ]
    assert tags(server)["mnist.trace.kept"] == "sampled"


def test_unsampled_requests_leave_no_trace_unless_they_fail(stack: Stack) -> None:
    unsampled = [new_trace_id() for _ in range(5)]
    for trace_id in unsampled:
        assert post(stack, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"})[0] == 200
    failed = new_trace_id()
    status, _ = post(
        stack, {"traceparent": f"00-{failed}-{secrets.token_hex(8)}-00"}, body=b"not a form"
    )
    assert 400 <= status < 500
    # Sent last: once it is in Jaeger, and once every other replica has exported since (every
    # 5 s) and the tail sampler decided (5 s), whatever the others left is there too.
    marker = new_trace_id()
    assert post(stack, {"traceparent": f"00-{marker}-{secrets.token_hex(8)}-01"})[0] == 200
    wait_for(lambda: trace(marker), timeout=ARRIVAL, what="the sampled marker trace")
    kept = wait_for(lambda: trace(failed), timeout=ARRIVAL, what="the failed request's trace")
    server = spans_by_name(kept)["POST /predict"]
    assert tags(server)["mnist.trace.kept"] == "failed"
    assert tags(server)["http.response.status_code"] == status
    time.sleep(12)
    for trace_id in unsampled:
        found = trace(trace_id)
        if found is not None:  # only if it was slow (TRACES_SLOW_MS, 250 ms) on a busy machine
            left = spans_by_name(found)["POST /predict"]
            assert tags(left)["mnist.trace.kept"] == "slow", tags(left)
            assert left["duration"] >= 250_000, left["duration"]


def big_digits(count: int) -> tuple[bytes, str]:
    """A /predict/batch body of `count` copies of a digit drawn 2,000 pixels wide: each costs
    the replica tens of milliseconds to decode and scale down."""
    image = Image.fromarray((digit_image() * 255).astype(np.uint8)).resize((2000, 2000))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    boundary = secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + buffer.getvalue()
        + b"\r\n"
        for i in range(count)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def test_an_unsampled_slow_request_is_kept_as_slow(stack: Stack) -> None:
    """A request that the head sampling passed over but that took longer than TRACES_SLOW_MS
    (250 ms) is kept whole, marked slow. Slow by its own work: more large images in one batch
    request until it takes over 400 ms on this machine (32 of them are 2 MiB of the 4 MiB an
    upload may be)."""
    count, seconds, trace_id = 4, 0.0, ""
    while seconds < 0.4 and count <= 32:
        body, content_type = big_digits(count)
        trace_id = new_trace_id()
        headers = {"Content-Type": content_type, "traceparent": f"00-{trace_id}-{'1' * 16}-00"}
        started = time.monotonic()
        status, _, _ = stack.request("POST", "/predict/batch", body, headers)
        seconds = time.monotonic() - started
        assert status == 200, status
        count *= 2
    assert seconds >= 0.4, f"32 large images took {seconds:.2f} s: too fast to be slow"
    found = wait_for(lambda: trace(trace_id), timeout=ARRIVAL, what="the slow request's trace")
    server = spans_by_name(found)["POST /predict/batch"]
    assert tags(server)["mnist.trace.kept"] == "slow"
    assert server["duration"] >= 250_000, server["duration"]  # microseconds
    assert sum(span["operationName"] == "mnist.preprocess" for span in found["spans"]) >= 4


def test_the_edge_starts_a_trace_and_logs_its_id(stack: Stack) -> None:
    """Without a traceparent nginx makes one: its trace id comes back as X-Trace-Id, is in
    nginx's access log, and (sampled or not) a failed request's trace is kept under it, rooted
    at the replica's server span."""
    status, headers = post(stack, body=b"not a form")
    assert 400 <= status < 500
    trace_id = headers["x-trace-id"]
    assert len(trace_id) == 32
    assert int(trace_id, 16)
    found = wait_for(lambda: trace(trace_id), timeout=ARRIVAL, what="the edge-made trace")
    server = spans_by_name(found)["POST /predict"]
    assert server["references"] == []  # the edge records no span: the server span is the root

    def logged() -> bool:
        lines = stack.compose("logs", "--no-log-prefix", "--since", "5m", "nginx").splitlines()
        return any(f'"trace_id":"{trace_id}"' in line for line in lines)

    wait_for(logged, timeout=30, what="the trace id in nginx's access log")


def test_exemplars_name_traces_that_jaeger_returns(stack: Stack) -> None:
    sent = {new_trace_id() for _ in range(20)}
    for trace_id in sent:
        post(stack, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})

    def exemplars_of_ours() -> set[str] | None:
        now = time.time()
        data = stack.prometheus_api(
            "query_exemplars",
            query='http_server_request_duration_seconds_bucket{job="mnist-api"}',
            start=str(now - 300),
            end=str(now),
        )
        ids = {e["labels"]["trace_id"] for series in data for e in series["exemplars"]}
        return (ids & sent) or None

    ours = wait_for(exemplars_of_ours, timeout=60, what="exemplars of the requests sent")
    # The trace an exemplar names is in Jaeger.
    trace_id = sorted(ours)[0]
    wait_for(lambda: trace(trace_id), timeout=ARRIVAL, what=f"exemplar trace {trace_id} in Jaeger")


def worker_memory(stack: Stack) -> dict[str, float]:
    return {k: v for k, v in memory_sample(stack).items() if k.startswith("api ")}


def test_without_jaeger_or_the_collector_requests_are_unaffected(stack: Stack) -> None:
    """Every request marked sampled (its traceparent says so; each worker keeps at most
    TRACES_KEPT_PER_SECOND of them) while the trace store, then the Collector, is down: no
    request fails, and the workers' memory stays bounded by the span queue (the SDK drops what
    does not fit)."""
    stack.ensure_replicas(REPLICAS)
    before = worker_memory(stack)
    for service in ("jaeger", "otel-collector"):
        with stack.stopped(service), Load(stack, clients=4, traceparent="01") as load:
            time.sleep(20)
        print(f"\n{service} down: {load.total} requests, failures {load.failures}")
        assert load.total > 200, load.statuses
        assert load.failures == {}, load.failures
    after = worker_memory(stack)
    grown = {k: after[k] - before[k] for k in before if k in after}
    print(f"workers' memory growth (MiB): {sorted(grown.values())}")
    assert grown, (before, after)
    assert max(grown.values()) < 40, grown
    wait_for(
        lambda: stack.scalar('up{job="otel-collector"}') == 1,
        timeout=60,
        what="the collector to be scraped again",
    )
    # Traces flow again once both are back.
    trace_id = new_trace_id()
    post(stack, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    wait_for(lambda: trace(trace_id), timeout=ARRIVAL * 2, what="traces to flow again")


def test_grafana_links_exemplars_to_the_jaeger_it_can_reach(stack: Stack) -> None:
    """The provisioned datasources: the Prometheus one sends an exemplar's trace_id to the
    Jaeger one (by its fixed uid), whose URL answers Jaeger's API from inside the stack's
    network (asked from the Prometheus container, as Grafana would ask)."""
    provisioned = yaml.safe_load(
        (REPO / "grafana/provisioning/datasources/datasources.yaml").read_text()
    )
    sources = {source["uid"]: source for source in provisioned["datasources"]}
    assert sources["jaeger"]["type"] == "jaeger"
    links = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert links == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    url = sources["jaeger"]["url"] + "/api/services"
    answer = stack.compose("exec", "-T", "prometheus", "wget", "-q", "-O", "-", url)
    services = json.loads(answer)["data"]
    assert "mnist-api" in services, services
    # Every dashboard target that asks for exemplars reads the histogram's own buckets.
    for path in sorted((REPO / "grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                if target.get("exemplar"):
                    assert "_bucket{" in target["expr"], (path.name, panel["title"])
