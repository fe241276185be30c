"""Digits as pen strokes, the way a person draws them on the web page: one template of control
points per digit, smoothed into curves and varied by a random slant, rotation, size, position and
wobble. Used to choose the page's canvas and brush (python -m harness.strokes) and by the
browser test, which draws them with a real mouse."""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
Stroke = list[Point]

# Control points in a unit box (x to the right, y down), one list per stroke of the pen.
TEMPLATES: dict[int, list[list[Point]]] = {
    0: [
        [
            (0.5, 0.08),
            (0.28, 0.18),
            (0.2, 0.45),
            (0.26, 0.75),
            (0.5, 0.92),
            (0.74, 0.76),
            (0.8, 0.45),
            (0.72, 0.18),
            (0.5, 0.08),
            (0.44, 0.12),
        ]
    ],
    1: [[(0.44, 0.17), (0.56, 0.08), (0.54, 0.5), (0.52, 0.92)]],
    2: [
        [
            (0.24, 0.3),
            (0.38, 0.12),
            (0.58, 0.09),
            (0.74, 0.24),
            (0.68, 0.45),
            (0.42, 0.7),
            (0.24, 0.9),
            (0.5, 0.88),
            (0.8, 0.9),
        ]
    ],
    3: [
        [
            (0.26, 0.18),
            (0.5, 0.08),
            (0.72, 0.2),
            (0.66, 0.38),
            (0.46, 0.48),
            (0.7, 0.58),
            (0.76, 0.78),
            (0.52, 0.92),
            (0.24, 0.84),
        ]
    ],
    4: [
        [(0.56, 0.08), (0.38, 0.36), (0.2, 0.62), (0.5, 0.62), (0.82, 0.6)],
        [(0.64, 0.34), (0.63, 0.64), (0.62, 0.93)],
    ],
    5: [
        [(0.74, 0.1), (0.5, 0.1), (0.32, 0.12)],
        [
            (0.32, 0.12),
            (0.29, 0.3),
            (0.28, 0.46),
            (0.5, 0.4),
            (0.72, 0.5),
            (0.76, 0.72),
            (0.58, 0.9),
            (0.36, 0.9),
            (0.22, 0.8),
        ],
    ],
    6: [
        [
            (0.68, 0.08),
            (0.46, 0.22),
            (0.3, 0.46),
            (0.26, 0.7),
            (0.4, 0.9),
            (0.64, 0.88),
            (0.74, 0.7),
            (0.62, 0.52),
            (0.42, 0.54),
            (0.28, 0.66),
        ]
    ],
    7: [[(0.2, 0.12), (0.5, 0.11), (0.8, 0.12), (0.62, 0.45), (0.44, 0.92)]],
    8: [
        [
            (0.66, 0.2),
            (0.5, 0.08),
            (0.32, 0.18),
            (0.36, 0.36),
            (0.5, 0.48),
            (0.7, 0.62),
            (0.72, 0.82),
            (0.5, 0.93),
            (0.28, 0.82),
            (0.3, 0.62),
            (0.5, 0.48),
            (0.64, 0.36),
            (0.66, 0.2),
        ]
    ],
    9: [
        [
            (0.7, 0.26),
            (0.54, 0.1),
            (0.32, 0.18),
            (0.3, 0.38),
            (0.48, 0.48),
            (0.7, 0.36),
            (0.7, 0.26),
            (0.68, 0.6),
            (0.64, 0.92),
        ]
    ],
}


def _catmull_rom(points: Sequence[Point], per_segment: int = 8) -> Stroke:
    """A smooth curve through the control points (uniform Catmull-Rom)."""
    if len(points) < 3:
        (x0, y0), (x1, y1) = points[0], points[-1]
        return [(x0 + (x1 - x0) * t / 8, y0 + (y1 - y0) * t / 8) for t in range(9)]
    padded = [points[0], *points, points[-1]]
    curve: Stroke = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        for step in range(per_segment):
            t = step / per_segment
            t2, t3 = t * t, t * t * t
            curve.append(
                tuple(  # type: ignore[arg-type]
                    0.5
                    * (
                        2 * p1[k]
                        + (-p0[k] + p2[k]) * t
                        + (2 * p0[k] - 5 * p1[k] + 4 * p2[k] - p3[k]) * t2
                        + (-p0[k] + 3 * p1[k] - 3 * p2[k] + p3[k]) * t3
                    )
                    for k in (0, 1)
                )
            )
    curve.append(points[-1])
    return curve


def strokes(digit: int, rng: np.random.Generator | None = None) -> list[Stroke]:
    """The digit's strokes in the unit box: the template as drawn, or varied by `rng` like the
    hand of another person (slant, rotation, width and height, position, wobble)."""
    templates = TEMPLATES[digit]
    if rng is None:
        return [_catmull_rom(stroke) for stroke in templates]
    slant = rng.uniform(-0.3, 0.3)
    angle = math.radians(rng.uniform(-15, 15))
    sx, sy = rng.uniform(0.7, 1.1), rng.uniform(0.8, 1.05)
    dx, dy = rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05)
    cos, sin = math.cos(angle), math.sin(angle)
    varied = []
    for stroke in templates:
        points = []
        for x, y in stroke:
            x, y = x + rng.normal(0, 0.025), y + rng.normal(0, 0.025)
            x, y = (x - 0.5) * sx + slant * (0.5 - y), (y - 0.5) * sy
            x, y = x * cos - y * sin, x * sin + y * cos
            points.append((0.5 + x + dx, 0.5 + y + dy))
        varied.append(_catmull_rom(points))
    return varied


EXTENT = 0.8  # of the canvas: how high a digit is drawn


def render(drawn: list[Stroke], *, size: int, width: float, extent: float = EXTENT) -> Image.Image:
    """The strokes as the page's canvas draws them: black round-capped lines on white, the
    digit `extent` of the canvas high, centred."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    margin = (1 - extent) / 2
    for stroke in drawn:
        points = [((margin + x * extent) * size, (margin + y * extent) * size) for x, y in stroke]
        draw.line(points, fill=0, width=round(width), joint="curve")
        for px, py in (points[0], points[-1]):
            r = width / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=0)
    return image


def png(image: Image.Image) -> bytes:
    """The image as the page uploads it (canvas.toBlob: PNG)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    """Accuracy of the real model on varied drawings, by canvas size and brush width: how the
    page's canvas and brush were chosen."""
    from app.config import Settings
    from app.inference.runtime import load_model
    from app.preprocessing import preprocess

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sizes", default="140,280,420", help="canvas sides, pixels")
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument(
        "--brushes", default="0.02,0.04,0.06,0.08,0.1,0.12,0.14,0.18", help="brush / digit height"
    )
    args = parser.parse_args()
    model = load_model(Settings())
    rng = np.random.default_rng(0)
    drawings = [(d, strokes(d, rng)) for d in range(10) for _ in range(args.per_digit)]
    labels = np.array([d for d, _ in drawings])
    print(f"{len(drawings)} drawings, each digit {EXTENT:.0%} of the canvas high")
    print("canvas px  brush px  brush/height  accuracy  worst digit (read as)")
    for size in (int(s) for s in args.sizes.split(",")):
        for ratio in (float(r) for r in args.brushes.split(",")):
            width = max(1, round(ratio * EXTENT * size))
            pixels = [
                preprocess(png(render(drawn, size=size, width=width)), max_pixels=10**7).pixels
                for _, drawn in drawings
            ]
            batch = np.stack(pixels)[..., None]
            predicted = np.concatenate(
                [model.predict(batch[i : i + 32]) for i in range(0, len(batch), 32)]
            ).argmax(axis=1)
            per_digit = [(predicted[labels == d] == d).mean() for d in range(10)]
            worst = int(np.argmin(per_digit))
            wrong = np.bincount(predicted[(labels == worst) & (predicted != worst)], minlength=10)
            print(
                f"{size:9d}  {width:8d}  {width / (EXTENT * size):12.3f}"
                f"  {(predicted == labels).mean():8.1%}  {worst} {per_digit[worst]:.0%}"
                f" ({int(wrong.argmax()) if wrong.any() else '-'})"
            )


if __name__ == "__main__":
    main()
