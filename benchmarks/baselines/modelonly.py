"""The service without its preprocessing: what batching and inference cost on their own.

The real service (the same app, batcher, LiteRT model and response), except that the decoded
upload goes to the model as it is, without `normalize_digit`. Between the ceiling (no model)
and the service, it splits the price of the model from the price of the MNIST normalisation.
Only for 28x28 uploads, such as the benchmark's PNG of an MNIST test digit.
gunicorn -c app/gunicorn.conf.py benchmarks.baselines.modelonly:app
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app import classifier
from app.main import create_app
from app.preprocessing import SIZE, CorruptImage, Digit


def _as_decoded(gray: npt.ArrayLike) -> Digit:
    pixels = np.asarray(gray, dtype=np.float32)
    if pixels.shape != (SIZE, SIZE):
        raise CorruptImage(f"this baseline takes {SIZE}x{SIZE} images, not {pixels.shape}")
    return Digit(pixels, blank=False)


# The classifier calls `normalize_digit` through its module: replaced there, in this process.
classifier.normalize_digit = _as_decoded  # type: ignore[attr-defined]
app = create_app()
