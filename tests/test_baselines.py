"""The benchmark's baselines, each started as `make bench-replica` starts it, answer its upload.

They are what the service's figures are compared with: a baseline that fails, or that quietly
still ran the part it claims to remove, would make every ratio wrong.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from harness import wrk
from harness.payloads import payloads
from harness.servers import gunicorn

ENV = {"OTEL_SDK_DISABLED": "true"}


def post(port: int, payload: wrk.Payload) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/predict", payload.body, {"Content-Type": payload.content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("app", "runtime"),
    [
        ("benchmarks.baselines.nomodel:app", None),
        ("benchmarks.baselines.modelonly:batching_app", "none"),
        ("benchmarks.baselines.modelonly:app", "litert"),
    ],
)
def test_each_baseline_answers_the_benchmark_upload(app: str, runtime: str | None) -> None:
    uploads = payloads()
    with gunicorn(app, workers=1, env=ENV) as server:
        status, body = post(server.port, uploads["png-28x28"])
        assert status == 200, body
        assert len(body["probabilities"]) == 10
        if runtime is None:
            return
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/model")
        model = json.loads(connection.getresponse().read())
        connection.close()
        assert model["runtime"] == runtime
        # Preprocessing is really gone: an upload that needs it (a 200x200 photo) is refused.
        status, body = post(server.port, uploads["jpeg-photo-200x200"])
        assert status == 400
        assert "28x28" in body["detail"]
