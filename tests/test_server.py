"""One replica as deployed: gunicorn, the uvicorn worker class, the real model, over TCP."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

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
