"""The service without its preprocessing, and without its model: what the rest costs.

* `app`: the real service (the same app, batcher, LiteRT model and answer), except that the
  decoded upload goes to the model as it is, without `normalize_digit`.
* `batching_app`: the same with a model that computes nothing (uniform probabilities): what
  the queue, the inference thread's hand-offs and the answer cost on their own.

Between the ceiling (no model) and the service, they split the service's cost into batching,
inference and preprocessing (`make bench-replica BENCH_ARGS=--breakdown`). Only for 28x28
uploads, such as the benchmark's PNG of an MNIST test digit. Run like the service:
gunicorn -c app/gunicorn.conf.py benchmarks.baselines.modelonly:app
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.config import Settings
from app.inference.runtime import NUM_CLASSES, ModelInfo
from app.main import create_app
from app.preprocessing import SIZE, CorruptImage, Digit


def _as_decoded(gray: npt.ArrayLike) -> Digit:
    pixels = np.asarray(gray, dtype=np.float32)
    if pixels.shape != (SIZE, SIZE):
        raise CorruptImage(f"this baseline takes {SIZE}x{SIZE} images, not {pixels.shape}")
    return Digit(pixels, blank=False)


class NullModel:
    """Uniform probabilities for any batch, at no cost."""

    info = ModelInfo(version="null", runtime="none", path="-")

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.full((len(batch), NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)


def _null_model(_settings: Settings) -> NullModel:
    return NullModel()


app = create_app(normalize=_as_decoded)
batching_app = create_app(model_loader=_null_model, normalize=_as_decoded)
