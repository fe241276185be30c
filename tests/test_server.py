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
