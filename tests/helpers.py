"""What the tests share that is not a fixture: a fake model, synthetic images, request bodies."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from app.inference.runtime import ModelInfo
from harness.wrk import Payload


class FakeModel:
    """Predicts the digit d = round(mean ink * 100) % 10 with probability 0.9: deterministic,
    cheap, and different for different images, so that tests can check routing of results."""

    def __init__(self) -> None:
        self.info = ModelInfo(version="test-1", runtime="fake", path="-", test_accuracy=0.5)
        self.calls: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        digits = (batch.reshape(len(batch), -1).mean(axis=1) * 100).round().astype(int) % 10
        out = np.full((len(batch), 10), 0.1 / 9, np.float32)
        out[np.arange(len(batch)), digits] = 0.9
        return out

    @staticmethod
    def expected(pixels: np.ndarray) -> int:
        return round(float(pixels.mean()) * 100) % 10


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def digit_image(size: int = 28, light_background: bool = False) -> np.ndarray:
    """A synthetic '7'-like stroke pattern, white on black unless light_background."""
    image = np.zeros((size, size), np.float32)
    s = size / 28
    image[int(6 * s) : int(9 * s), int(6 * s) : int(22 * s)] = 1.0  # top bar
    for row in range(int(9 * s), int(23 * s)):  # the diagonal
        col = int(22 * s - (row - 9 * s) * 0.6)
        image[row, max(col - int(2 * s), 0) : col + 1] = 1.0
    return 1.0 - image if light_background else image


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few KB that decode to a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def multipart(data: bytes, field: str = "file", filename: str = "digit.png") -> tuple[bytes, str]:
    payload = Payload.multipart(data, filename, field=field)
    return payload.body, payload.content_type
