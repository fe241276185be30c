"""Every setting of the service, read once from the environment.

One typed class; defaults are safe for production. Values are validated at start-up, so a
misconfigured replica refuses to start with a message instead of failing on the first request.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- model ---------------------------------------------------------------------------
    model_path: Path = Field(
        default=REPO_ROOT / "model" / "mnist_model.h5",
        description="The trained model. A .h5/.keras file is served through the LiteRT export "
        "next to it (same stem, .tflite) when that export matches it, else with TensorFlow.",
    )
    model_runtime: Literal["auto", "litert", "tensorflow"] = Field(
        default="auto",
        description="auto: LiteRT when a matching .tflite exists, else TensorFlow.",
    )
    low_confidence_threshold: float = Field(default=0.7, gt=0.0, lt=1.0)

    # --- upload limits -------------------------------------------------------------------
    max_upload_bytes: int = Field(
        default=4 * MiB, gt=0, description="Largest request body accepted (bytes)."
    )
    max_image_pixels: int = Field(
        default=16_000_000, gt=0, description="Largest image accepted (width x height)."
    )
    max_batch_files: int = Field(default=64, gt=0, description="Files per /predict/batch call.")

    # --- batching ------------------------------------------------------------------------
    batch_max_size: int = Field(default=32, ge=1, le=256)
    batch_max_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="How long a partly filled batch may wait for more requests. Applies only "
        "when other requests are already queued; a lone request never waits.",
    )
    queue_max_size: int = Field(
        default=256, ge=1, description="Images waiting for inference per worker; beyond, 503."
    )
    # --- admission (app/admission.py) ----------------------------------------------------
    latency_budget_ms: float = Field(
        default=500.0,
        gt=0.0,
        le=60_000.0,
        description="A prediction request that could not be answered within this long from "
        "the moment the edge forwarded it is refused with 503 and Retry-After, before its "
        "body is read; every other request is queued and served, except in an overload, "
        "where the newest are served first and none waits over a tenth of this.",
    )
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Prediction requests one worker serves at once; the others wait for a "
        "place (in arrival order, newest first in an overload) without using the CPU.",
    )
    max_queued: int = Field(
        default=1024,
        ge=0,
        description="Requests one worker lets wait for a place; beyond, 503 at once. A bound "
        "on memory, far above what the latency budget lets wait.",
    )
    # --- traces (app/tracing.py; the standard OTEL_TRACES_* variables are the SDK's) -------
    traces_slow_ms: int = Field(
        default=250,
        ge=0,
        description="A request slower than this keeps its trace even when not sampled. Whole "
        "milliseconds: the Collector's tail sampling reads the same variable.",
    )
    traces_kept_per_second: float = Field(
        default=10.0,
        ge=0.0,
        description="Per worker, at most this many traces a second are kept beyond the ones "
        "sampled by the ratio: the failed and slow ones, and those a client marked sampled.",
    )
    preprocess_threads: int = Field(default=2, ge=1, le=64)
    inline_preprocess_max_pixels: int = Field(
        default=128 * 128,
        ge=0,
        description="Images up to this size are preprocessed on the event loop, where a "
        "thread hand-off would cost more than the work; larger ones go to a thread pool.",
    )

    @model_validator(mode="after")
    def _check_model(self) -> Settings:
        if self.model_path.suffix.lower() not in {".h5", ".keras", ".tflite"}:
            raise ValueError(
                f"MODEL_PATH={self.model_path}: expected a .h5, .keras or .tflite file"
            )
        return self


@lru_cache
def from_environment() -> Settings:
    """The settings of this process's environment, read and validated once."""
    return Settings()
