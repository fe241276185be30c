"""Turn an uploaded image into what the model was trained on.

The model sees MNIST: a 28x28 grayscale image, white ink on black, the digit scaled into a 20x20
box with its aspect ratio kept and placed so that its centre of mass is at the centre (LeCun et
al.'s recipe). Uploads are anything but: phone photos of paper, scans, canvas exports with a
transparent background, CMYK JPEGs, 16-bit PNGs, animated GIFs, a small digit on a large page.

Two stages:

* `open_image` / `to_grayscale` (uploads only): check size limits before decoding, decode, apply
  the EXIF orientation, take the first frame, handle alpha and bit depth, and return grayscale
  floats in [0, 1] at a bounded working resolution.
* `normalize_digit` (uploads *and* training data): detect polarity, flatten uneven lighting,
  remove the background, crop to the ink, scale into 20x20 and centre by mass in 28x28.

`model/train.py` passes every MNIST image through `normalize_digit` too, so the model is trained
on exactly what this module produces at serving time: there is no train/serve skew.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

FloatImage = npt.NDArray[np.float32]

# We enforce our own, stricter pixel limit (`max_pixels`) before anything is decoded, so
# Pillow's global decompression-bomb guard (a warning at 89 MP) is redundant here.
Image.MAX_IMAGE_PIXELS = None

SIZE = 28  # model input side
BOX = 20  # the digit's longer side inside the 28x28 frame
# Where MNIST puts the centre of mass, in array indices (measured on the 50k training images:
# 13.996 and 14.008).
CENTRE = 14.0
# Uploads are reduced to at most this many pixels a side before normalisation: enough for a
# digit that fills 1/20 of a phone photo to keep ~50 px, and it bounds the cost of a 16 MP upload.
WORK_SIDE = 1024

ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


class ImageError(ValueError):
    """An upload that cannot be turned into a digit. `status_code` is the HTTP answer."""

    status_code = 400
    kind = "invalid_image"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.index: int | None = None  # which file of a batch, when there are several


class EmptyImage(ImageError):
    kind = "empty"


class CorruptImage(ImageError):
    kind = "corrupt"


class UnsupportedImage(ImageError):
    status_code = 415
    kind = "unsupported"


class ImageTooLarge(ImageError):
    status_code = 413
    kind = "too_large"


@dataclass(frozen=True, slots=True)
class Digit:
    """A normalised digit: `pixels` is 28x28 float32 in [0, 1], white ink on black."""

    pixels: FloatImage
    blank: bool  # no ink was found: the prediction that follows means nothing


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _sniff(head: bytes) -> str | None:
    """The accepted format that `head` starts like, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)


def _looks_like_svg(head: bytes) -> bool:
    text = head.lstrip().lower()
    return text.startswith((b"<?xml", b"<svg", b"<!doctype svg")) or b"<svg" in text[:512]


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the image header and check the limits. Cheap: no pixel data is decoded yet."""
    if not data:
        raise EmptyImage("the uploaded file is empty")
    if _looks_like_svg(data[:1024]):
        raise UnsupportedImage(
            "SVG is not supported: upload a raster image (" + ", ".join(ACCEPTED_FORMATS) + ")"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        claimed = _sniff(data[:16])
        if claimed is not None:
            raise CorruptImage(f"the file starts like a {claimed} but is corrupt") from None
        raise UnsupportedImage(
            "not a recognised image: accepted formats are " + ", ".join(ACCEPTED_FORMATS)
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(f"the image header is corrupt: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    return image


def to_grayscale(image: Image.Image) -> FloatImage:
    """Decode `image` to grayscale floats in [0, 1] (original polarity, alpha flattened)."""
    try:
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale (1/2 .. 1/8): a large photo costs a fraction.
            image.draft(image.mode if image.mode in ("L", "RGB") else None, (WORK_SIDE, WORK_SIDE))
        # Animated GIF/PNG/WebP and multi-page TIFF open on their first frame: that is the one
        # decoded here.
        image.load()
        if "exif" in image.info or image.format == "TIFF":
            image = ImageOps.exif_transpose(image) or image  # phones store photos sideways
        if max(image.size) > WORK_SIDE:
            image = image.copy()
            image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
        return _gray_floats(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncated and corrupt data as any of these.
        raise CorruptImage(
            f"the image could not be decoded (truncated or corrupt): {exc}"
        ) from None


# 8-bit level -> float in [0, 1]: a table lookup gives the same values as dividing by 255, at
# a fraction of the cost on small images.
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _gray_floats(image: Image.Image) -> FloatImage:
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max(initial=0.0))
        scale = np.float32(65535.0 if top > 255.0 else (255.0 if top > 1.0 else 1.0))
        clipped: FloatImage = np.clip(values / scale, 0.0, 1.0)
        return clipped
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        gray = image if mode == "L" else image.convert("L")
        levels = np.frombuffer(gray.tobytes(), np.uint8).reshape(gray.height, gray.width)
        return _LEVELS.take(levels)
    la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32) / 255.0
    luminance, alpha = la[..., 0], la[..., 1]
    if float(alpha.min()) >= 0.999:
        return np.ascontiguousarray(luminance)
    # A drawing on a transparent canvas: the strokes are where alpha is. Flatten it onto a
    # background that contrasts with the stroke colour, whatever colour the strokes are.
    opaque = alpha > 0.5
    ink = float(luminance[opaque].mean()) if opaque.any() else 0.0
    background = np.float32(1.0 if ink < 0.5 else 0.0)
    flattened: FloatImage = luminance * alpha + background * (np.float32(1.0) - alpha)
    return flattened


# --------------------------------------------------------------------------------------------
# Normalisation (shared with training)
# --------------------------------------------------------------------------------------------


def _tile_background(gray: FloatImage, *, light: bool) -> FloatImage:
    """A smooth estimate of the background brightness at every pixel.

    The image is cut into an 8x8 grid of tiles; in each, the paper is the bright end (the
    90th percentile) of a light page, or the dark end (10th) of a dark one, as long as ink
    covers less than 90 % of the tile. A 3x3 max (min) over tiles covers tiles that ink fills.
    """
    height, width = gray.shape
    tile = max(8, max(height, width) // 8)
    rows, cols = max(1, height // tile), max(1, width // tile)
    th, tw = height // rows, width // cols
    tiles = gray[: rows * th, : cols * tw].reshape(rows, th, cols, tw).transpose(0, 2, 1, 3)
    level = np.percentile(tiles.reshape(rows, cols, th * tw), 90 if light else 10, axis=-1)
    padded = np.pad(level, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    level = windows.max(axis=(-1, -2)) if light else windows.min(axis=(-1, -2))
    surface = Image.fromarray(level.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(surface, dtype=np.float32)


def _quantile(values: FloatImage, q: float, *, scratch: bool = False) -> float:
    """The q-quantile (0..1) of `values`, nearest rank. A partial sort is much cheaper than
    np.median/np.percentile on the small arrays that most uploads are. `scratch`: `values`
    is a temporary that may be reordered in place (saves a copy)."""
    flat = values.ravel() if scratch else values.flatten()
    k = min(flat.size - 1, max(0, round(q * (flat.size - 1))))
    flat.partition(k)
    return float(flat[k])


def _ink_bbox(mask: npt.NDArray[np.bool_]) -> tuple[int, int, int, int] | None:
    rows = np.asarray(mask.any(axis=1))
    top = int(rows.argmax())
    if not rows[top]:
        return None
    cols = np.asarray(mask.any(axis=0))
    left = int(cols.argmax())
    bottom = rows.size - int(rows[::-1].argmax())
    right = cols.size - int(cols[::-1].argmax())
    return top, bottom, left, right


def _lanczos(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    inside = np.abs(x) < 3.0
    return np.where(inside, np.sinc(x) * np.sinc(x / 3.0), 0.0)


@lru_cache(maxsize=64)
def _resampling_matrix(size: int, new_size: int) -> npt.NDArray[np.float64]:
    """The (new_size, size) matrix of Lanczos-3 weights that resamples a row of `size` pixels
    to `new_size`: the coefficients Pillow computes for `Image.resize(..., LANCZOS)` (the
    kernel is widened by the scale factor when reducing, and each row sums to 1).

    Applied as two small matrix products, it gives Pillow's result (to 1 float32 ulp) on
    digit-sized crops at a fraction of the cost. At most 20 x 1024 doubles each."""
    scale = size / new_size
    stretch = max(scale, 1.0)
    support = 3.0 * stretch
    weights = np.zeros((new_size, size), np.float64)
    for row in range(new_size):
        centre = (row + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), size)
        taps = _lanczos((np.arange(first, stop, dtype=np.float64) - centre + 0.5) / stretch)
        total = taps.sum()
        weights[row, first:stop] = taps / total if total != 0.0 else taps
    weights.setflags(write=False)
    return weights


def _resize(x: FloatImage, new_h: int, new_w: int) -> FloatImage:
    """Lanczos resampling of `x` to (new_h, new_w): rows first, then columns, like Pillow."""
    h, w = x.shape
    if new_w != w:
        x = (x @ _resampling_matrix(w, new_w).T).astype(np.float32)
    if new_h != h:
        x = (_resampling_matrix(h, new_h) @ x).astype(np.float32)
    return x


def normalize_digit(gray: npt.ArrayLike) -> Digit:
    """Normalise one grayscale image (any size, any polarity, floats in [0, 1]) to MNIST form."""
    x = np.asarray(gray, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {x.shape}")
    height, width = x.shape
    if x.size == 0:
        return _blank()
    brightest, darkest = x.max(), x.min()
    if float(brightest - darkest) < 0.04:
        return _blank()  # uniform: empty page, all-ink, or no contrast worth the name

    # 1. Polarity from the border: MNIST is light ink on a dark background.
    border = np.concatenate((x[0], x[-1], x[1:-1, 0], x[1:-1, -1]))
    light_background = _quantile(border, 0.5, scratch=True) > 0.5

    # 2. Lighting. A photo of paper is brighter where the light falls: divide by the local
    #    paper brightness (flat-field correction). Small images are taken as evenly lit.
    if min(height, width) >= 64:
        surface = _tile_background(x, light=light_background)
        if light_background:
            reflectance = np.clip(x / np.maximum(surface, np.float32(1e-3)), 0.0, 1.0)
            x = (1.0 - reflectance).astype(np.float32, copy=False)
        else:
            x = np.clip(x - surface, 0.0, 1.0).astype(np.float32, copy=False)
        brightest = x.max()
    elif light_background:
        x = 1.0 - x
        brightest = np.float32(1.0) - darkest  # the same value as x.max(), for free

    # 3. Background level and noise, robustly (median and MAD; the ink is a minority).
    sample = x[::4, ::4] if x.size > 65536 else x
    floor = _quantile(sample, 0.5)
    noise = 1.4826 * _quantile(np.abs(sample - floor), 0.5, scratch=True)
    low = floor + max(3.0 * noise, 0.02)
    if float(brightest) - low < 0.1:
        return _blank()

    # 4. Crop to the ink. On large images, find it on a 4x reduced copy: averaging over 4x4
    #    blocks suppresses isolated specks of noise that would stretch the box.
    if min(height, width) >= 128:
        small = x[: height // 4 * 4, : width // 4 * 4]
        small = small.reshape(height // 4, 4, width // 4, 4).mean(axis=(1, 3))
        box = _ink_bbox(small > low + 0.5 * (float(small.max()) - low))
        if box is None:
            return _blank()
        top, bottom, left, right = box
        top, left = max(0, 4 * top - 4), max(0, 4 * left - 4)
        bottom, right = min(height, 4 * bottom + 4), min(width, 4 * right + 4)
        x = x[top:bottom, left:right]
    ink = x > low
    box = _ink_bbox(ink)
    if box is None:
        return _blank()
    top, bottom, left, right = box
    x = x[top:bottom, left:right]
    ink = ink[top:bottom, left:right]

    # 5. Contrast: background to 0, the ink's core to 1.
    high = _quantile(x[ink], 0.95, scratch=True)
    if high - low < 0.1:
        return _blank()
    x = x - low
    x /= high - low
    np.clip(x, 0.0, 1.0, out=x)

    # 6. Scale into the 20x20 box, keeping the aspect ratio.
    h, w = x.shape
    scale = BOX / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_h, new_w) != (h, w):
        x = _resize(x, new_h, new_w)
        np.clip(x, 0.0, 1.0, out=x)

    # 7. Centre of mass to the centre of the 28x28 frame.
    rows, cols = x.sum(axis=1), x.sum(axis=0)
    mass = float(rows.sum())
    if mass <= 0.0:
        return _blank()
    cy = float(_INDEX[:new_h] @ rows) / mass
    cx = float(_INDEX[:new_w] @ cols) / mass
    top = min(max(round(CENTRE - cy), 0), SIZE - new_h)
    left = min(max(round(CENTRE - cx), 0), SIZE - new_w)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + new_h, left : left + new_w] = x
    return Digit(out, blank=False)


_INDEX = np.arange(BOX, dtype=np.float32)  # row and column numbers in the 20x20 box


def _blank() -> Digit:
    """No ink was found."""
    return Digit(np.zeros((SIZE, SIZE), np.float32), blank=True)


def preprocess(data: bytes, *, max_pixels: int) -> Digit:
    """Bytes of an uploaded image to a normalised digit. Raises `ImageError` subclasses."""
    return normalize_digit(to_grayscale(open_image(data, max_pixels=max_pixels)))
