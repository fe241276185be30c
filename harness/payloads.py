"""The benchmark payload mix, as clients send it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from harness import uploads, wrk
from harness.mnist_slice import load_test_slice


def digit(index: int = 0) -> uploads.Digit:
    images, _ = load_test_slice()
    return np.asarray(images[index], np.float32)


def payloads() -> dict[str, wrk.Payload]:
    """The payload mix: an MNIST digit as users of the seed sent it, a phone photo of it cut
    down to 200x200, and an RGBA canvas drawing, as a browser exports it."""
    rng = np.random.default_rng(5)
    photo = Image.open(io.BytesIO(uploads.phone_photo(digit(), rng)))
    buffer = io.BytesIO()
    photo.resize((200, 200)).save(buffer, "JPEG", quality=85)
    return {
        "png-28x28": wrk.Payload.multipart(uploads.mnist_png(digit(), rng), "digit.png"),
        "jpeg-photo-200x200": wrk.Payload.multipart(
            buffer.getvalue(), "photo.jpg", mime="image/jpeg"
        ),
        "png-canvas-280x280": wrk.Payload.multipart(
            uploads.canvas_rgba(digit(), rng), "canvas.png"
        ),
    }
