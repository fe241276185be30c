"""The HTTP API with a fake model: shapes, headers, health, and every kind of bad request."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import socket

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.preprocessing import normalize_digit
from tests.helpers import FakeModel, bomb_png, digit_image, png_bytes

DIGIT = png_bytes(digit_image())


def upload(data: bytes, name: str = "digit.png", field: str = "file") -> dict[str, object]:
    return {"files": {field: (name, data, "image/png")}}


def test_predict_returns_the_documented_shape(client: TestClient) -> None:
    response = client.post("/predict", **upload(DIGIT))  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "digit",
        "confidence",
        "probabilities",
        "low_confidence",
        "warning",
        "model_version",
    }
    assert len(body["probabilities"]) == 10
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert body["confidence"] == pytest.approx(max(body["probabilities"]))
    assert body["digit"] == int(np.argmax(body["probabilities"]))
    assert body["digit"] == FakeModel.expected(normalize_digit(digit_image()).pixels)
    assert body["model_version"] == "test-1"
    assert body["low_confidence"] is False
    assert body["warning"] is None


def test_every_response_names_the_worker_that_served_it(client: TestClient) -> None:
    expected = f"{socket.gethostname()}/{os.getpid()}"
    assert client.post("/predict", **upload(DIGIT)).headers["x-served-by"] == expected  # type: ignore[arg-type]
    assert client.get("/healthz").headers["x-served-by"] == expected
    assert client.post("/predict", content=b"{}").headers["x-served-by"] == expected


def test_blank_image_is_answered_with_low_confidence(client: TestClient) -> None:
    blank = png_bytes(np.ones((64, 64), np.float32))
    body = client.post("/predict", **upload(blank)).json()  # type: ignore[arg-type]
    assert body["low_confidence"] is True
    assert "blank" in body["warning"]


def test_what_start_up_made_is_frozen_out_of_the_collector_while_the_app_serves(
    settings: Settings,
) -> None:
    app = create_app(settings, model_loader=lambda _s: FakeModel())
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the modules, the app and the model, not a handful
        assert client.post("/predict", **upload(DIGIT)).status_code == 200  # type: ignore[arg-type]
    assert gc.get_freeze_count() == 0  # given back at shutdown


def test_low_confidence_threshold_is_applied(settings: Settings) -> None:
    strict = settings.model_copy(update={"low_confidence_threshold": 0.95})
    app = create_app(strict, model_loader=lambda _s: FakeModel())  # its confidence is 0.9
    with TestClient(app) as client:
        body = client.post("/predict", **upload(DIGIT)).json()  # type: ignore[arg-type]
    assert body["low_confidence"] is True
    assert "below 0.95" in body["warning"]


def test_batch_returns_one_result_per_file_in_order(client: TestClient) -> None:
    images = [digit_image(28 + 8 * i) for i in range(5)]
    images[2] = np.roll(images[2], 3, axis=1)
    files = [("files", (f"d{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "test-1"
    assert [r["filename"] for r in body["results"]] == [f"d{i}.png" for i in range(5)]
    expected = [FakeModel.expected(normalize_digit(im).pixels) for im in images]
    assert [r["digit"] for r in body["results"]] == expected


def test_a_bad_file_in_a_batch_is_named(client: TestClient) -> None:
    files = [
        ("files", ("good.png", DIGIT, "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 415
    assert response.json()["detail"].startswith("files[1] (bad.png): not a recognised image")


def test_too_many_files_in_a_batch(settings: Settings) -> None:
    app = create_app(
        settings.model_copy(update={"max_batch_files": 3}), model_loader=lambda _s: FakeModel()
    )
    with TestClient(app) as client:
        files = [("files", (f"{i}.png", DIGIT, "image/png")) for i in range(4)]
        response = client.post("/predict/batch", files=files)
    assert response.status_code in (400, 413)
    assert "detail" in response.json()


@pytest.mark.parametrize(
    ("kwargs", "status", "phrase"),
    [
        (upload(b""), 400, "empty"),
        (upload(b"GIF89a but not really"), 400, "corrupt"),
        (upload(b"just some text"), 415, "not a recognised image"),
        (upload(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "x.svg"), 415, "SVG"),
        (upload(DIGIT[: len(DIGIT) // 2]), 400, "truncated"),
        (upload(bomb_png(12000, 12000)), 413, "pixels"),
        (upload(DIGIT, field="image"), 422, "body.file: Field required"),
        ({"files": {"file": (None, "a string, not a file")}}, 422, "body.file"),
        ({"json": {"file": "aGVsbG8="}}, 415, "multipart/form-data"),
        ({"content": b"\x89PNG", "headers": {"content-type": "image/png"}}, 415, "image/png"),
        ({}, 415, "multipart/form-data"),
        (
            {
                "content": b"--x\r\nbroken",
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
            422,
            "Field required",
        ),
    ],
    ids=[
        "empty",
        "corrupt-gif",
        "text",
        "svg",
        "truncated",
        "bomb",
        "misnamed-field",
        "string-field",
        "json",
        "raw-png",
        "no-body",
        "broken-multipart",
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(
    client: TestClient, kwargs: dict[str, object], status: int, phrase: str
) -> None:
    response = client.post("/predict", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert phrase in detail
    # ... and the worker keeps serving.
    assert client.post("/predict", **upload(DIGIT)).status_code == 200  # type: ignore[arg-type]


def test_oversized_body_is_413(client: TestClient) -> None:
    big = b"\x89PNG" + os.urandom(5 * 1024 * 1024)
    response = client.post("/predict", **upload(big))  # type: ignore[arg-type]
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> object:
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    response = client.post(
        "/predict",
        content=chunks(),  # type: ignore[arg-type]
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert response.status_code == 413


def test_discarding_a_refused_body_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api import middleware

    async def endless() -> dict[str, object]:
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def silent() -> dict[str, object]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def main() -> None:
        # In bytes: an endless body is read up to the limit, no further.
        calls = 0

        async def counted() -> dict[str, object]:
            nonlocal calls
            calls += 1
            return await endless()

        await middleware.discard_body(counted, limit=10_000)
        assert calls == 11
        # In time: a client that stops sending is given up on.
        monkeypatch.setattr(middleware, "DISCARD_SECONDS", 0.05)
        await asyncio.wait_for(middleware.discard_body(silent), timeout=2)

    asyncio.run(main())


def test_pixel_limit_is_a_setting(settings: Settings) -> None:
    app = create_app(
        settings.model_copy(update={"max_image_pixels": 100}), model_loader=lambda _s: FakeModel()
    )
    with TestClient(app) as client:
        response = client.post("/predict", **upload(png_bytes(digit_image(11))))  # type: ignore[arg-type]
    assert response.status_code == 413
    assert "the limit is 100" in response.json()["detail"]


def test_large_uploads_are_preprocessed_off_the_event_loop(client: TestClient) -> None:
    photo = io.BytesIO()
    from PIL import Image

    Image.fromarray((digit_image(900, light_background=True) * 255).astype(np.uint8)).save(
        photo, "PNG"
    )
    response = client.post("/predict", **upload(photo.getvalue(), "page.png"))  # type: ignore[arg-type]
    assert response.status_code == 200
    assert response.json()["digit"] == FakeModel.expected(normalize_digit(digit_image(900)).pixels)


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_before_the_model_is_loaded(settings: Settings) -> None:
    app = create_app(settings, model_loader=lambda _s: FakeModel())
    client = TestClient(app)  # no `with`: the lifespan (model loading) has not run
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    predict = client.post("/predict", **upload(DIGIT))  # type: ignore[arg-type]
    assert predict.status_code == 503
    assert predict.headers["retry-after"] == "1"


def test_a_model_that_cannot_load_fails_startup(settings: Settings) -> None:
    from app.inference.runtime import ModelLoadError

    def broken(_s: Settings) -> FakeModel:
        raise ModelLoadError("MODEL_PATH=/nope: no such file")

    with (
        pytest.raises(ModelLoadError, match="no such file"),
        TestClient(create_app(settings, broken)),
    ):
        pass


def test_model_metadata(client: TestClient) -> None:
    body = client.get("/model").json()
    assert body["version"] == "test-1"
    assert body["runtime"] == "fake"
    assert body["input_shape"] == [28, 28, 1]
    assert body["test_accuracy"] == 0.5


def test_overload_is_503_with_retry_after(settings: Settings) -> None:
    import threading

    gate = threading.Event()
    gate.set()

    class SlowModel(FakeModel):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            gate.wait(5)  # held closed while the test floods the queue
            return super().predict(batch)

    tight = settings.model_copy(update={"queue_max_size": 2, "batch_max_size": 1})
    app = create_app(tight, model_loader=lambda _s: SlowModel())
    with TestClient(app) as client:
        gate.clear()
        classifier = app.state.classifier

        async def flood() -> list[object]:
            digit = normalize_digit(digit_image()).pixels
            tasks = [asyncio.ensure_future(classifier.batcher.predict(digit))]
            await asyncio.sleep(0.05)  # the first is in the (held) model; two more fill the queue
            tasks += [asyncio.ensure_future(classifier.batcher.predict(digit)) for _ in range(2)]
            await asyncio.sleep(0)
            assert classifier.batcher.depth == 2
            return tasks

        tasks = client.portal.call(flood)  # type: ignore[union-attr]
        response = client.post("/predict", **upload(DIGIT))  # type: ignore[arg-type]
        gate.set()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "overloaded" in response.json()["detail"]
        assert len(tasks) == 3

        async def drained() -> None:
            await asyncio.gather(*tasks)

        client.portal.call(drained)  # type: ignore[union-attr]
        assert client.post("/predict", **upload(DIGIT)).status_code == 200  # type: ignore[arg-type]


def test_openapi_documents_the_upload(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
