"""From uploaded bytes to a prediction: preprocessing, then batched inference.

Preprocessing a small upload (a 28x28 PNG) costs less than handing it to a thread, so it runs
on the event loop; anything larger is decoded and normalised in a thread pool, so a 16 MP photo
never stalls the loop. Inference always runs on the batcher's own thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app import tracing
from app.config import Settings
from app.inference.batcher import Batcher
from app.inference.runtime import Model, warm_up
from app.preprocessing import Digit, ImageError, normalize_digit, open_image, to_grayscale
from app.schemas import Prediction
from app.telemetry import Metrics

BLANK_WARNING = "no ink found: the image is blank or uniform"


class NotReady(Exception):
    """The model is not loaded and warmed up yet, or the worker is stopping."""


Normalize = Callable[[np.ndarray], Digit]


class Classifier:
    """`normalize` turns a decoded grayscale upload into the model's input: the MNIST recipe
    (`normalize_digit`) unless a baseline measures the service without it."""

    def __init__(
        self,
        settings: Settings,
        model: Model,
        metrics: Metrics,
        normalize: Normalize = normalize_digit,
    ) -> None:
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.normalize = normalize
        self.ready = False
        self.batcher = Batcher(
            model.predict,
            max_batch_size=settings.batch_max_size,
            max_queue=settings.queue_max_size,
            max_wait=settings.batch_max_wait_ms / 1000.0,
            on_batch=metrics.record_batch,
        )
        self._pool = ThreadPoolExecutor(
            settings.preprocess_threads, thread_name_prefix="preprocess"
        )

    async def start(self) -> None:
        """Start the batcher and warm the model up; `ready` turns true once that is done."""
        self.batcher.start()
        await asyncio.to_thread(warm_up, self.model, self.settings.batch_max_size)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def digit(self, data: bytes) -> Digit:
        """Decode and normalise one upload. Raises `ImageError` for bad input."""
        started = time.perf_counter()
        image = open_image(data, max_pixels=self.settings.max_image_pixels)
        decoded = time.perf_counter()
        width, height = image.size
        if width * height <= self.settings.inline_preprocess_max_pixels:
            digit = self.normalize(to_grayscale(image))
        else:
            loop = asyncio.get_running_loop()
            digit = await loop.run_in_executor(
                self._pool, lambda: self.normalize(to_grayscale(image))
            )
        finished = time.perf_counter()
        self.metrics.preprocess.record(finished - started)
        trace = tracing.current()
        if trace is not None:
            trace.step("mnist.decode", started, decoded, {"mnist.image.format": image.format or ""})
            trace.step("mnist.preprocess", decoded, finished)
        return digit

    async def classify(self, data: bytes) -> Prediction:
        (prediction,) = await self.classify_many([data])
        return prediction

    async def classify_many(self, uploads: Sequence[bytes]) -> list[Prediction]:
        """Predictions for each upload, in order. Raises for the first bad upload."""
        if not self.ready:
            raise NotReady("the model is loading")
        # Shed before preprocessing: under overload a rejection must stay cheap.
        self.batcher.check_room(len(uploads))
        digits = []
        for index, data in enumerate(uploads):
            try:
                digits.append(await self.digit(data))
            except ImageError as exc:
                exc.index = index
                raise
        trace = tracing.current()
        if len(digits) == 1:
            probabilities = [await self.batcher.predict(digits[0].pixels, trace)]
        else:
            probabilities = await self.batcher.predict_many([d.pixels for d in digits], trace)
        return [self._answer(d, p) for d, p in zip(digits, probabilities, strict=True)]

    def _answer(self, digit: Digit, probabilities: np.ndarray) -> Prediction:
        best = int(probabilities.argmax())
        confidence = float(probabilities[best])
        low = digit.blank or confidence < self.settings.low_confidence_threshold
        warning = None
        if digit.blank:
            warning = BLANK_WARNING
        elif low:
            warning = (
                f"confidence {confidence:.2f} is below {self.settings.low_confidence_threshold:.2f}"
            )
        self.metrics.record_prediction(best, confidence, low)
        return Prediction(
            digit=best,
            confidence=confidence,
            probabilities=[float(p) for p in probabilities],
            low_confidence=low,
            warning=warning,
            model_version=self.model.info.version,
        )
