"""Shared fixtures. Unit tests may fake the model (tests.helpers); the accuracy tests use the real
one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.helpers import FakeModel

REPO = Path(__file__).resolve().parent.parent

# Unit tests run without a collector; the telemetry tests give the app a provider of their own.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")


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
