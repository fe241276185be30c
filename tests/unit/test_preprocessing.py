"""Preprocessing: every kind of upload, degenerate images, polarity, and hostile input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app import preprocessing
from app.preprocessing import (
    BOX,
    SIZE,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    UnsupportedImage,
    _resize,
    normalize_digit,
    preprocess,
)
from harness.mnist_slice import load_test_slice
from harness.uploads import KINDS, make
from tests.helpers import bomb_png, digit_image, png_bytes

LIMIT = 16_000_000


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    mass = pixels.sum()
    return float((ys * pixels).sum() / mass), float((xs * pixels).sum() / mass)


def ink_box(pixels: np.ndarray, level: float = 0.05) -> tuple[int, int]:
    rows = np.flatnonzero((pixels > level).any(axis=1))
    cols = np.flatnonzero((pixels > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_test_slice()


# --- the MNIST recipe ---------------------------------------------------------------------


def test_mnist_digits_come_back_nearly_unchanged(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images = mnist[0][:200]
    out = np.stack([normalize_digit(img).pixels for img in images])
    assert out.shape == (200, SIZE, SIZE)
    assert out.dtype == np.float32
    assert float(np.abs(out - images).mean()) < 0.01


def test_digit_is_scaled_into_20x20_and_centred_by_mass() -> None:
    big = np.zeros((300, 200), np.float32)
    big[50:250, 80:120] = 1.0  # a tall bar, off-centre
    digit = normalize_digit(big)
    height, width = ink_box(digit.pixels)
    assert height == BOX
    assert width == pytest.approx(BOX * 40 / 200, abs=1.5)  # aspect ratio kept
    cy, cx = centre_of_mass(digit.pixels)
    assert cy == pytest.approx(14.0, abs=0.6)
    assert cx == pytest.approx(14.0, abs=0.6)


@pytest.mark.parametrize("size", [28, 100, 400])
def test_polarity_is_detected(size: int) -> None:
    dark_on_light = normalize_digit(digit_image(size, light_background=True)).pixels
    light_on_dark = normalize_digit(digit_image(size, light_background=False)).pixels
    assert dark_on_light.mean() < 0.35  # MNIST-like: mostly black background
    assert np.abs(dark_on_light - light_on_dark).mean() < 0.03


def test_uneven_lighting_is_flattened() -> None:
    size = 400
    gradient = np.linspace(0.45, 1.0, size, dtype=np.float32)[None, :].repeat(size, axis=0)
    ink = digit_image(size)
    photo = gradient * (1 - 0.8 * ink)  # dark ink on paper lit from the right
    digit = normalize_digit(photo)
    assert not digit.blank
    reference = normalize_digit(1 - ink).pixels
    assert np.abs(digit.pixels - reference).mean() < 0.05


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((28, 28), np.float32),
        np.ones((28, 28), np.float32),  # all ink
        np.full((500, 300), 0.5, np.float32),
        np.zeros((1, 1), np.float32),
        np.random.default_rng(0).normal(0.5, 0.005, (64, 64)).astype(np.float32),
    ],
    ids=["black", "white", "grey", "one-pixel", "faint-noise"],
)
def test_blank_images_are_flagged_not_crashed(image: np.ndarray) -> None:
    digit = normalize_digit(image)
    assert digit.blank
    assert digit.pixels.shape == (SIZE, SIZE)
    assert not digit.pixels.any()
    assert np.isfinite(digit.pixels).all()


def test_a_single_dot_and_a_thin_line_do_not_divide_by_zero() -> None:
    dot = np.zeros((28, 28), np.float32)
    dot[10, 10] = 1.0
    line = np.zeros((50, 50), np.float32)
    line[25, 5:45] = 1.0
    for image in (dot, line):
        digit = normalize_digit(image)
        assert np.isfinite(digit.pixels).all()
        assert digit.pixels.max() <= 1.0


# --- decoding of every upload kind --------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_upload_kind_matches_the_digit_it_was_made_from(
    kind: str, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    images = mnist[0][:20]
    distances = []
    for i, image in enumerate(images):
        digit = preprocess(make(kind, image, seed=i), max_pixels=LIMIT)
        assert not digit.blank
        reference = normalize_digit(image).pixels
        distances.append(float(np.abs(digit.pixels - reference).mean()))
    # Mean absolute difference per pixel; unrelated digits differ by ~0.2.
    assert float(np.median(distances)) < 0.1, distances


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"])
def test_pillow_modes_decode_to_the_same_digit(mode: str) -> None:
    base = Image.fromarray((digit_image(56, light_background=True) * 255).astype(np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base, np.uint16) * 257)
    else:
        image = base.convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    digit = preprocess(
        encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})), max_pixels=LIMIT
    )
    reference = normalize_digit(np.asarray(base, np.float32) / 255).pixels
    assert not digit.blank
    assert np.abs(digit.pixels - reference).mean() < 0.05


def test_transparent_canvas_with_white_strokes() -> None:
    alpha = (digit_image(200) * 255).astype(np.uint8)
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = alpha
    digit = preprocess(encode(Image.fromarray(rgba), "PNG"), max_pixels=LIMIT)
    reference = normalize_digit(digit_image(200)).pixels
    assert np.abs(digit.pixels - reference).mean() < 0.03


def test_fully_transparent_image_is_blank() -> None:
    rgba = np.zeros((50, 50, 4), np.uint8)
    assert preprocess(encode(Image.fromarray(rgba), "PNG"), max_pixels=LIMIT).blank


def test_exif_orientation_is_applied() -> None:
    upright = Image.fromarray((digit_image(120, light_background=True) * 255).astype(np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor saw it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    digit = preprocess(data, max_pixels=LIMIT)
    reference = normalize_digit(np.asarray(upright, np.float32) / 255).pixels
    assert np.abs(digit.pixels - reference).mean() < 0.05


def test_animated_gif_uses_the_first_frame() -> None:
    first = Image.fromarray((digit_image(60, light_background=True) * 255).astype(np.uint8))
    other = Image.fromarray(np.full((60, 60), 30, np.uint8))
    data = encode(first.convert("P"), "GIF", save_all=True, append_images=[other.convert("P")])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    digit = preprocess(data, max_pixels=LIMIT)
    reference = normalize_digit(np.asarray(first, np.float32) / 255).pixels
    assert np.abs(digit.pixels - reference).mean() < 0.03


# --- hostile and broken input -------------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = bomb_png(12000, 12000)
    assert len(data) < 40_000
    with pytest.raises(ImageTooLarge, match="12000x12000"):
        preprocess(data, max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", EmptyImage),
        (b"hello, this is not an image", UnsupportedImage),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImage),
        (b"<svg width='10' height='10'></svg>", UnsupportedImage),
        (b"%PDF-1.7\n", UnsupportedImage),
    ],
    ids=["empty", "text", "svg-xml", "svg", "pdf"],
)
def test_non_images_are_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        preprocess(data, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_images_are_refused(fmt: str) -> None:
    image = Image.fromarray(
        (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    ).convert("RGB")
    data = encode(image, fmt)
    with pytest.raises((CorruptImage, UnsupportedImage)):
        preprocess(data[: len(data) // 2], max_pixels=LIMIT)


def test_corrupt_pixel_data_is_refused() -> None:
    data = bytearray(png_bytes(digit_image(64)))
    start = data.index(b"IDAT") + 4
    data[start : start + 20] = b"\xff" * 20
    with pytest.raises(CorruptImage):
        preprocess(bytes(data), max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("height", "width"), [(1, 1), (3, 7), (20, 14), (28, 28), (45, 20), (300, 211), (1024, 700)]
)
def test_resize_is_pillows_lanczos(height: int, width: int) -> None:
    """The digit is scaled with matrices of Pillow's Lanczos weights, not Pillow itself (5x
    cheaper on a digit): the result must be Pillow's, up- and downscaling alike, or the model
    would see something else than it was trained on."""
    rng = np.random.default_rng(height * 1000 + width)
    x = rng.random((height, width), dtype=np.float32)
    scale = BOX / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    pillow = Image.fromarray(x, mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS)
    ours = _resize(x, new_h, new_w)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, np.asarray(pillow), rtol=0, atol=1e-6)


def test_eight_bit_levels_are_exact() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    gray = preprocessing._gray_floats(Image.fromarray(levels, mode="L"))
    np.testing.assert_array_equal(gray, levels.astype(np.float32) / np.float32(255.0))
