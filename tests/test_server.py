"""One replica as deployed: gunicorn, the uvicorn worker class, the real model, over TCP."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from harness.servers import gunicorn
from tests.helpers import digit_image, multipart, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with gunicorn("app.main:app", workers=1, env={"OTEL_SDK_DISABLED": "true"}) as started:
        yield started.port


def test_keep_alive_and_close_both_deliver_whole_responses(server: int) -> None:
    body, content_type = multipart(png_bytes(digit_image()))
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    for _ in range(20):  # one keep-alive connection
        connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["model_version"]
    connection.request("GET", "/healthz", headers={"Connection": "close"})
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read()) == {"status": "ok"}
    connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_upload_sent_whole_gets_the_json_413_not_a_reset(
    server: int, chunked: bool
) -> None:
    # http.client sends the whole body before it reads the answer, as curl and most clients do.
    body, content_type = multipart(b"\x89PNG\r\n\x1a\n" + b"\0" * (5 << 20))
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    try:
        if chunked:
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            connection.request(
                "POST",
                "/predict",
                body=pieces,
                headers={"Content-Type": content_type},
                encode_chunked=True,
            )
        else:
            connection.request(
                "POST", "/predict", body=body, headers={"Content-Type": content_type}
            )
        response = connection.getresponse()
        assert response.status == 413
        assert "too large" in json.loads(response.read())["detail"]
    finally:
        connection.close()


def test_every_endpoint_keeps_to_its_openapi_document(server: int) -> None:
    """Schemathesis' generated requests for every operation of the service's own OpenAPI
    document, valid and not (random bytes as images, missing and wrong fields): never a 5xx,
    and every answer as the document says."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{server}/openapi.json")
    tried: dict[str, int] = {}
    for found in schema.get_all_operations():
        operation = found.ok()  # type: ignore[union-attr]  # an invalid schema fails here
        tried[operation.label] = 0

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case[Any]) -> None:
            tried[case.operation.label] += 1
            # Any bytes are schema-valid as a `format: binary` file, but not every file is an
            # image: a 4xx for one that is not is right, so that check is left out.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
    print(f"\nrequests per operation: {tried}")
    assert len(tried) >= 5
    assert all(count > 0 for count in tried.values())
