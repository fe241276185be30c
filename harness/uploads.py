"""A test set of realistic uploads, made from MNIST test digits.

Each kind turns a 28x28 MNIST digit into the kind of file users really send, with the defects
that come with it: a phone photo of paper (uneven light, grey ink, blur, noise, tilt, JPEG), a
scan (black on white, sharp, high resolution), a small digit somewhere on a large page with
specks of dust, an RGBA canvas export with a transparent background and a thick brush, a CMYK
JPEG, a 16-bit PNG, an animated GIF whose first frame holds the digit. Deterministic for a seed.

`python -m harness.uploads --out DIR` writes a sample of each kind to look at.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

Digit = npt.NDArray[np.float32]  # 28x28, [0, 1], white on black
Maker = Callable[[Digit, np.random.Generator], bytes]


def _ink(digit: Digit, size: int, rng: np.random.Generator, angle: float = 0.0) -> Image.Image:
    """The digit as an 'F' image `size` pixels high, smooth strokes, optionally rotated."""
    image = Image.fromarray(digit.astype(np.float32), mode="F")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC)
    return image


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _to8(values: npt.NDArray[np.floating]) -> Image.Image:
    return Image.fromarray((np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8))


def mnist_png(digit: Digit, rng: np.random.Generator) -> bytes:
    return _save(_to8(digit), "PNG")


def phone_photo(digit: Digit, rng: np.random.Generator) -> bytes:
    height, width = 480, 640
    size = int(rng.integers(140, 300))
    ink = np.asarray(_ink(digit, size, rng, float(rng.uniform(-8, 8))))
    ink = np.clip(ink * 1.3, 0, 1)
    top = int(rng.integers(20, height - size - 20)) if height - size > 40 else 0
    left = int(rng.integers(40, width - size - 40))
    mask = np.zeros((height, width), np.float32)
    mask[top : top + size, left : left + size] = ink
    # Paper under a lamp: brightness falls off across the sheet.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    light = 1.0 - rng.uniform(0.25, 0.45) * np.hypot(yy - cy, xx - cx) / np.hypot(height, width)
    paper = rng.uniform(0.8, 0.95) * light
    ink_level = rng.uniform(0.1, 0.3)
    gray = paper * (1 - mask) + ink_level * light * mask
    blurred = _to8(gray).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    gray = np.asarray(blurred, np.float32) / 255 + rng.normal(0, 0.025, gray.shape)
    tint = rng.uniform(0.9, 1.05, 3)
    rgb = np.clip(gray[..., None] * tint, 0, 1)
    image = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    return _save(image, "JPEG", quality=int(rng.integers(70, 92)))


def scan(digit: Digit, rng: np.random.Generator) -> bytes:
    size = int(rng.integers(300, 600))
    ink = np.asarray(_ink(digit, size, rng))
    ink = np.clip((ink - 0.35) * 4, 0, 1)  # a scanner's crisp, nearly binary strokes
    margin = int(rng.integers(20, 120))
    page = np.ones((size + 2 * margin, size + 2 * margin), np.float32)
    page[margin : margin + size, margin : margin + size] -= 0.95 * ink
    page += rng.normal(0, 0.01, page.shape)
    fmt = "PNG" if rng.random() < 0.5 else "JPEG"
    return _save(_to8(page), fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def small_on_page(digit: Digit, rng: np.random.Generator) -> bytes:
    height, width = 1754, 1240  # A4 at 150 dpi
    size = int(rng.integers(60, 140))
    ink = np.asarray(_ink(digit, size, rng))
    page = np.full((height, width), 0.97, np.float32)
    top, left = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
    page[top : top + size, left : left + size] -= 0.85 * np.clip(ink * 1.2, 0, 1)
    for _ in range(int(rng.integers(3, 12))):  # dust: single dark pixels
        page[int(rng.integers(0, height)), int(rng.integers(0, width))] = rng.uniform(0.3, 0.7)
    return _save(_to8(page), "PNG")


def canvas_rgba(digit: Digit, rng: np.random.Generator) -> bytes:
    size = 280  # a typical HTML canvas
    ink = np.asarray(_ink(digit, size, rng))
    # A round brush: strokes fatter and fully opaque, edges anti-aliased.
    alpha = np.asarray(
        Image.fromarray((np.clip(ink * 1.6, 0, 1) * 255).astype(np.uint8)).filter(
            ImageFilter.MaxFilter(int(rng.choice([1, 3, 5])))
        )
    )
    color = (0, 0, 0) if rng.random() < 0.7 else tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.2:
        color = (255, 255, 255)  # white strokes on a transparent background
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = color
    rgba[..., 3] = alpha
    return _save(Image.fromarray(rgba, "RGBA"), "PNG")


def cmyk_jpeg(digit: Digit, rng: np.random.Generator) -> bytes:
    ink = np.asarray(_ink(digit, 112, rng))
    rgb = _to8(1.0 - ink).convert("RGB")
    return _save(rgb.convert("CMYK"), "JPEG", quality=90)


def png16(digit: Digit, rng: np.random.Generator) -> bytes:
    ink = np.asarray(_ink(digit, 56, rng))
    values = 1.0 - ink if rng.random() < 0.5 else ink
    image = Image.fromarray((np.clip(values, 0, 1) * 65535).astype(np.uint16))  # I;16
    return _save(image, "PNG")


def animated_gif(digit: Digit, rng: np.random.Generator) -> bytes:
    first = _to8(1.0 - np.asarray(_ink(digit, 84, rng))).convert("P")
    noise = Image.fromarray(rng.integers(0, 256, (84, 84), dtype=np.uint8)).convert("P")
    return _save(first, "GIF", save_all=True, append_images=[noise, noise], duration=100, loop=0)


KINDS: dict[str, Maker] = {
    "mnist_png": mnist_png,
    "phone_photo": phone_photo,
    "scan": scan,
    "small_on_page": small_on_page,
    "canvas_rgba": canvas_rgba,
    "cmyk_jpeg": cmyk_jpeg,
    "png16": png16,
    "animated_gif": animated_gif,
}


def make(kind: str, digit: Digit, seed: int) -> bytes:
    return KINDS[kind](digit, np.random.default_rng(seed))


def main() -> None:
    from harness.mnist_slice import load_test_slice

    parser = argparse.ArgumentParser(description="Write sample uploads of each kind.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args()
    images, labels = load_test_slice()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        for i in range(args.count):
            data = make(kind, images[i], seed=i)
            suffix = {b"\x89P": "png", b"\xff\xd8": "jpg", b"GI": "gif"}.get(data[:2], "bin")
            (args.out / f"{kind}-{i}-label{labels[i]}.{suffix}").write_bytes(data)
    print(f"wrote {args.count * len(KINDS)} files to {args.out}")


if __name__ == "__main__":
    main()
