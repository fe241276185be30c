"""Liveness, readiness and model metadata."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import ClassifierDep
from app.schemas import ErrorBody, ModelMetadata, Status

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """Liveness: the worker's event loop answers. Cheap, and independent of the model."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Status | JSONResponse:
    """Readiness: 200 once the model is loaded and warmed up and the batcher runs; 503 before
    that and while the worker shuts down."""
    classifier = getattr(request.app.state, "classifier", None)
    if classifier is None or not classifier.ready:
        return JSONResponse({"detail": "not ready: the model is loading"}, status_code=503)
    if not classifier.batcher.running:
        return JSONResponse(
            {"detail": "not ready: the inference loop has stopped"}, status_code=503
        )
    return Status(status="ready")


@router.get("/model", response_model=ModelMetadata)
async def model_metadata(classifier: ClassifierDep) -> ModelMetadata:
    """What is being served."""
    info = classifier.model.info
    return ModelMetadata(
        version=info.version,
        runtime=info.runtime,
        export=info.details.get("export"),
        input_shape=list(info.input_shape),
        test_accuracy=info.test_accuracy,
        max_batch_size=classifier.settings.batch_max_size,
        low_confidence_threshold=classifier.settings.low_confidence_threshold,
    )
