"""Loading the model and running it on a batch.

The service runs the LiteRT export of the Keras model (`mnist_model.tflite`): it is much faster
than a `tf.function` at small batches (the model card has the figures) and keeps TensorFlow out
of the serving image.
`MODEL_PATH` may name the Keras file (the artefact of record); its LiteRT export is used when
`metrics.json` says the export was made from that very file. Otherwise, or with
MODEL_RUNTIME=tensorflow, the Keras file is run as a `tf.function` with a fixed input signature
(never `model.predict`, which builds a dataset and a function per call).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app.config import Settings

log = logging.getLogger(__name__)

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
Batch = npt.NDArray[np.float32]


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the worker refuses to start."""


@dataclass(frozen=True)
class ModelInfo:
    version: str
    runtime: str
    path: str
    input_shape: tuple[int, ...] = INPUT_SHAPE
    test_accuracy: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Model(Protocol):
    info: ModelInfo

    def predict(self, batch: Batch) -> Batch:
        """(n, 28, 28, 1) float32 in [0, 1] -> (n, 10) class probabilities. Not thread-safe:
        one thread per model instance."""
        ...


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_metrics(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "metrics.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable model metadata: {exc}") from exc
    return data


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_batch` (the last may not be a power of two)."""
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(sizes[-1] * 2, max_batch))
    return sizes


@dataclass(frozen=True)
class _Bucket:
    """One interpreter, allocated for batches of exactly `size`."""

    size: int
    interpreter: Any
    input_index: int
    output_index: int


class LiteRTModel:
    """A LiteRT interpreter per batch-size bucket (1, 2, 4, ... max), each allocated once.

    Resizing an interpreter's input re-plans its memory, so batches run on these fixed sizes.
    A batch is split over them (13 = 8 + 4 + 1) rather than padded up to the next one, as a
    padded row costs as much as a real one (docs/design.md#batches-on-fixed-interpreter-sizes).
    """

    def __init__(self, path: Path, info: ModelInfo, max_batch: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.info = info
        content = path.read_bytes()
        self._buckets: list[_Bucket] = []
        for size in batch_sizes(max_batch):
            try:
                interpreter = Interpreter(model_content=content, num_threads=1)
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"{path}: not a valid LiteRT model: {exc}") from exc
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
            if tuple(inp["shape"][1:]) != INPUT_SHAPE or int(out["shape"][-1]) != NUM_CLASSES:
                raise ModelLoadError(
                    f"{path}: expects input {tuple(inp['shape'])} and gives "
                    f"{tuple(out['shape'])}; the service needs (n, 28, 28, 1) -> (n, 10)"
                )
            interpreter.resize_tensor_input(inp["index"], [size, *INPUT_SHAPE])
            interpreter.allocate_tensors()
            self._buckets.append(_Bucket(size, interpreter, inp["index"], out["index"]))

    def predict(self, batch: Batch) -> Batch:
        results = []
        start, n = 0, len(batch)
        while start < n:
            # The largest bucket that the rest fills; the 1-bucket ends any remainder.
            bucket = next(b for b in reversed(self._buckets) if b.size <= n - start)
            bucket.interpreter.set_tensor(bucket.input_index, batch[start : start + bucket.size])
            bucket.interpreter.invoke()
            results.append(bucket.interpreter.get_tensor(bucket.output_index))
            start += bucket.size
        return np.concatenate(results) if len(results) > 1 else results[0]


class TensorFlowModel:
    """The Keras model as a `tf.function` with a fixed [None, 28, 28, 1] signature."""

    def __init__(self, path: Path, info: ModelInfo) -> None:
        try:
            import keras
            import tensorflow as tf
        except ImportError as exc:
            raise ModelLoadError(
                f"{path} needs TensorFlow, which is not installed here; serve its LiteRT "
                "export (make train writes one) or install tensorflow-cpu"
            ) from exc
        try:
            model = keras.models.load_model(path, compile=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot load the Keras model: {exc}") from exc
        self.info = info
        self._fn = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)],
        )

    def predict(self, batch: Batch) -> Batch:
        return np.asarray(self._fn(batch), dtype=np.float32)


def load_model(settings: Settings) -> Model:
    """Load the model named by the settings, or raise `ModelLoadError` saying why not."""
    path = settings.model_path
    if not path.is_file():
        raise ModelLoadError(f"MODEL_PATH={path}: no such file")
    metrics = _read_metrics(path.parent)
    test = metrics.get("serving", {})
    version = str(metrics.get("version") or f"unversioned-{_sha256(path)[:8]}")

    tflite: Path | None = None
    if path.suffix == ".tflite":
        tflite = path
    elif settings.model_runtime != "tensorflow":
        candidate = path.with_suffix(".tflite")
        exported_from = metrics.get("files", {}).get(candidate.name, {}).get("exported_from_sha256")
        if candidate.is_file() and exported_from == _sha256(path):
            tflite = candidate
        elif settings.model_runtime == "litert":
            raise ModelLoadError(
                f"MODEL_RUNTIME=litert but {candidate} is missing or was not exported from "
                f"{path.name} (per metrics.json); re-run `make train`"
            )
    if settings.model_runtime == "tensorflow" and tflite is not None and path == tflite:
        raise ModelLoadError("MODEL_RUNTIME=tensorflow needs a .h5 or .keras MODEL_PATH")

    if tflite is not None:
        info = ModelInfo(
            version=version,
            runtime="litert",
            path=str(tflite),
            test_accuracy=test.get("accuracy"),
            details={"export": test.get("export", "unknown")},
        )
        model: Model = LiteRTModel(tflite, info, settings.batch_max_size)
    else:
        keras_accuracy = metrics.get("test", {}).get("keras", {}).get("accuracy")
        info = ModelInfo(
            version=version, runtime="tensorflow", path=str(path), test_accuracy=keras_accuracy
        )
        model = TensorFlowModel(path, info)
    log.info("loaded model %s (%s) from %s", info.version, info.runtime, info.path)
    return model


def warm_up(model: Model, max_batch: int) -> None:
    """Run every batch size once so that the first real requests pay no first-call costs,
    and check that the model answers with probabilities."""
    for size in batch_sizes(max_batch):
        out = model.predict(np.zeros((size, *INPUT_SHAPE), np.float32))
        if out.shape != (size, NUM_CLASSES) or not np.isfinite(out).all():
            raise ModelLoadError(f"warm-up: the model returned {out.shape}, not ({size}, 10)")
