"""Settings: read from the environment, validated, unsafe values refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from harness.servers import REPO


def test_defaults_are_safe() -> None:
    settings = Settings()
    assert settings.model_path.name == "mnist_model.h5"
    assert settings.max_upload_bytes < 5 * 1024 * 1024  # a 5 MiB body is refused
    assert settings.max_image_pixels < 12000 * 12000
    assert settings.batch_max_wait_ms == 0.0
    assert 1 <= settings.batch_max_size <= settings.queue_max_size
    # Admission refuses by time; its count bound is far above what the budget lets wait.
    assert 250 <= settings.latency_budget_ms <= 500
    assert settings.max_queued >= 1000


def test_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_PATH", "/models/other.tflite")
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("BATCH_MAX_SIZE", "8")
    monkeypatch.setenv("BATCH_MAX_WAIT_MS", "2.5")
    settings = Settings()
    assert settings.model_path == Path("/models/other.tflite")
    assert settings.max_upload_bytes == 1000
    assert settings.batch_max_size == 8
    assert settings.batch_max_wait_ms == 2.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODEL_PATH", "/models/model.onnx"),
        ("MODEL_RUNTIME", "pytorch"),
        ("MAX_UPLOAD_BYTES", "0"),
        ("MAX_UPLOAD_BYTES", "lots"),
        ("BATCH_MAX_SIZE", "0"),
        ("BATCH_MAX_SIZE", "100000"),
        ("BATCH_MAX_WAIT_MS", "-1"),
        ("QUEUE_MAX_SIZE", "0"),
        ("LOW_CONFIDENCE_THRESHOLD", "1.5"),
        ("LATENCY_BUDGET_MS", "0"),
        ("TRACES_SLOW_MS", "250.5"),
        ("TRACES_SLOW_MS", "-1"),
        ("TRACES_KEPT_PER_SECOND", "-1"),
        ("LATENCY_BUDGET_MS", "soon"),
        ("MAX_CONCURRENCY", "0"),
        ("MAX_QUEUED", "-1"),
    ],
)
def test_invalid_values_refuse_to_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_every_variable_the_service_reads_is_in_the_readme() -> None:
    """The README's configuration tables name every variable app/ reads: the settings class's
    and those read directly (gunicorn, the health check, telemetry)."""
    names = {name.upper() for name in Settings.model_fields}
    for path in (REPO / "app").rglob("*.py"):
        names |= set(
            re.findall(r'(?:environ\.get|getenv|_int)\("([A-Z][A-Z0-9_]+)"', path.read_text())
        )
    readme = (REPO / "README.md").read_text()
    configuration = readme[readme.index("## Configuration") : readme.index("## Architecture")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", configuration))
    assert len(names) > 20
    assert sorted(names - documented) == []
