"""The ceiling: the same gunicorn/FastAPI stack with the model removed.

It parses the multipart upload and decodes the PNG, and answers a prediction-shaped JSON
without preprocessing or inference. Whatever the real service costs beyond this is the price
of the model. Run it like the service: gunicorn -c app/gunicorn.conf.py
benchmarks.baselines.nomodel:app
"""

from __future__ import annotations

import io
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile
from PIL import Image

from app.api.middleware import ServedByMiddleware

app = FastAPI(title="no-model baseline")
app.add_middleware(ServedByMiddleware)

UNIFORM = [0.1] * 10


@app.post("/predict")
async def predict(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    image = Image.open(io.BytesIO(await file.read()))
    image.load()
    return {
        "digit": 0,
        "confidence": 0.1,
        "probabilities": UNIFORM,
        "low_confidence": True,
        "warning": None,
        "model_version": "no-model",
    }


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}
