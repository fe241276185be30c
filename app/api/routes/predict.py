"""POST /predict and POST /predict/batch."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, UploadFile

from app.api.deps import ClassifierDep, SettingsDep
from app.preprocessing import ImageError
from app.schemas import BatchItem, BatchPrediction, ErrorBody, Prediction

router = APIRouter(tags=["predict"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "The file is empty, truncated or corrupt.",
        413: "The body, the image's pixel count or the number of files is over the limit.",
        415: "Not an image in a supported format (PNG, JPEG, GIF, WebP, BMP, TIFF), or the "
        "body is not multipart/form-data.",
        422: "The multipart field is missing or misnamed.",
        503: "Overloaded or starting: retry after the Retry-After header's seconds.",
    }.items()
}


@router.post("/predict", response_model=Prediction, responses=ERRORS)
async def predict(
    classifier: ClassifierDep,
    file: Annotated[UploadFile, File(description="An image of one handwritten digit.")],
) -> Prediction:
    """Classify one image."""
    return await classifier.classify(await file.read())


@router.post("/predict/batch", response_model=BatchPrediction, responses=ERRORS)
async def predict_batch(
    classifier: ClassifierDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File(description="Images, one digit each.")],
) -> BatchPrediction:
    """Classify several images in one request; one result per file, in order. A bad file
    rejects the whole request, naming the file."""
    if len(files) > settings.max_batch_files:
        raise HTTPException(
            413, f"{len(files)} files: the limit is {settings.max_batch_files} per request"
        )
    uploads = [await f.read() for f in files]
    try:
        predictions = await classifier.classify_many(uploads)
    except ImageError as exc:
        if exc.index is not None:
            exc.detail = f"files[{exc.index}] ({files[exc.index].filename}): {exc.detail}"
        raise
    return BatchPrediction(
        model_version=classifier.model.info.version,
        results=[
            BatchItem(**p.model_dump(), filename=f.filename)
            for p, f in zip(predictions, files, strict=True)
        ],
    )
