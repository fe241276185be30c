"""The JSON shapes of the API (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9, description="The most probable digit.")
    confidence: float = Field(ge=0.0, le=1.0, description="Its probability.")
    probabilities: list[float] = Field(
        min_length=10, max_length=10, description="Probability of each digit, 0 to 9."
    )
    low_confidence: bool = Field(
        description="True when confidence is below the service's "
        "threshold or the image is blank: do not trust the digit."
    )
    warning: str | None = Field(default=None, description="Why the answer is unreliable.")
    model_version: str


class BatchItem(Prediction):
    filename: str | None = None


class BatchPrediction(BaseModel):
    model_version: str
    results: list[BatchItem] = Field(description="One result per uploaded file, in order.")


class ModelMetadata(BaseModel):
    version: str
    runtime: str = Field(description="litert or tensorflow")
    export: str | None = None
    input_shape: list[int]
    test_accuracy: float | None = Field(description="On the 10,000 MNIST test images.")
    max_batch_size: int
    low_confidence_threshold: float


class Status(BaseModel):
    status: str


class ErrorBody(BaseModel):
    detail: str
