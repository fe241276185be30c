"""Shared fixtures. Unit tests may fake the model; the accuracy tests use the real one."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.inference.runtime import ModelInfo

REPO = Path(__file__).resolve().parent.parent

# Unit tests run without a collector; the telemetry tests give the app a provider of their own.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")


class FakeModel:
    """Predicts the digit d = round(mean ink * 100) % 10 with probability 0.9: deterministic,
    cheap, and different for different images, so that tests can check routing of results."""

    def __init__(self) -> None:
        self.info = ModelInfo(version="test-1", runtime="fake", path="-", test_accuracy=0.5)
        self.calls: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        digits = (batch.reshape(len(batch), -1).mean(axis=1) * 100).round().astype(int) % 10
        out = np.full((len(batch), 10), 0.1 / 9, np.float32)
        out[np.arange(len(batch)), digits] = 0.9
        return out

    @staticmethod
    def expected(pixels: np.ndarray) -> int:
        return round(float(pixels.mean()) * 100) % 10


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def digit_image(size: int = 28, light_background: bool = False) -> np.ndarray:
    """A synthetic '7'-like stroke pattern, white on black unless light_background."""
    image = np.zeros((size, size), np.float32)
    s = size / 28
    image[int(6 * s) : int(9 * s), int(6 * s) : int(22 * s)] = 1.0  # top bar
    for row in range(int(9 * s), int(23 * s)):  # the diagonal
        col = int(22 * s - (row - 9 * s) * 0.6)
        image[row, max(col - int(2 * s), 0) : col + 1] = 1.0
    return 1.0 - image if light_background else image


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    model = tmp_path / "fake.tflite"
    model.write_bytes(b"unused by the fake model")
    return Settings(model_path=model)


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def client(settings: Settings, fake_model: FakeModel) -> Iterator[TestClient]:
    from app.main import create_app

    app = create_app(settings, model_loader=lambda _settings: fake_model)
    with TestClient(app) as test_client:
        yield test_client
