"""The floor: the obvious implementation, as the project's seed had it.

Keras `model.predict` per request, called inside the `async def` handler (so on the event
loop), on an image resized to 28x28 without the MNIST normalisation. It needs TensorFlow
(`make install` has it). gunicorn -c app/gunicorn.conf.py benchmarks.baselines.naive:app
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from app.config import from_environment

state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    state["model"] = keras.models.load_model(from_environment().model_path, compile=False)
    yield


app = FastAPI(title="naive baseline", lifespan=lifespan)


@app.post("/predict")
async def predict(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    x = np.asarray(image, np.float32).reshape(1, 28, 28, 1) / 255.0
    probabilities = state["model"].predict(x, verbose=0)[0]
    digit = int(probabilities.argmax())
    return {
        "digit": digit,
        "confidence": float(probabilities[digit]),
        "probabilities": probabilities.tolist(),
        "model_version": "naive",
    }


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}
