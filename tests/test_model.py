"""The real, committed model: accuracy on MNIST and on realistic uploads, and how it loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.inference.runtime import LiteRTModel, ModelLoadError, load_model
from app.preprocessing import normalize_digit, preprocess
from harness.mnist_slice import load_test_slice
from harness.uploads import KINDS, make

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
PER_KIND = 150


@pytest.fixture(scope="module")
def model() -> LiteRTModel:
    loaded = load_model(Settings())
    assert isinstance(loaded, LiteRTModel)
    return loaded


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_test_slice()


def classify(model: LiteRTModel, digits: list[np.ndarray]) -> np.ndarray:
    batch = np.stack(digits)[..., None]
    return np.concatenate([model.predict(batch[i : i + 32]) for i in range(0, len(batch), 32)])


def test_accuracy_on_the_mnist_test_slice(
    model: LiteRTModel, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist
    predicted = classify(model, [normalize_digit(img).pixels for img in images]).argmax(axis=1)
    accuracy = float((predicted == labels).mean())
    print(f"\nMNIST test slice ({len(labels)} images): {accuracy:.2%}")
    assert accuracy >= 0.99


def test_accuracy_on_realistic_uploads(
    model: LiteRTModel, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist
    # A different stretch of the slice for each kind, so that 1,200 distinct digits are used.
    report = {}
    correct = total = 0
    for k, kind in enumerate(sorted(KINDS)):
        chosen = range(k * PER_KIND, (k + 1) * PER_KIND)
        digits = [
            preprocess(make(kind, images[i], seed=i), max_pixels=16_000_000).pixels for i in chosen
        ]
        predicted = classify(model, digits).argmax(axis=1)
        hits = int((predicted == labels[list(chosen)]).sum())
        report[kind] = hits / PER_KIND
        correct += hits
        total += PER_KIND
    overall = correct / total
    print(f"\nrealistic uploads ({total} files): {overall:.2%}")
    for kind, accuracy in report.items():
        print(f"  {kind:14s} {accuracy:.2%}")
    assert overall >= 0.97
    assert min(report.values()) >= 0.93, report


def test_batches_split_over_the_buckets_give_the_same_answers(
    model: LiteRTModel, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    digits = np.stack([normalize_digit(img).pixels for img in mnist[0][:70]])[..., None]
    one_by_one = np.concatenate([model.predict(digits[i : i + 1]) for i in range(70)])
    for size in (3, 5, 17, 32, 70):  # 2+1, 4+1, 16+1, 32, 32+32+4+2
        together = model.predict(digits[:size])
        assert together.shape == (size, 10)
        np.testing.assert_allclose(together, one_by_one[:size], atol=1e-5)


def test_model_path_to_the_keras_file_serves_its_litert_export(model: LiteRTModel) -> None:
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert model.info.runtime == "litert"
    assert model.info.path.endswith("mnist_model.tflite")
    assert model.info.version == metrics["version"]
    assert model.info.test_accuracy == metrics["serving"]["accuracy"] >= 0.995


def test_a_stale_export_is_not_served(tmp_path: Path) -> None:
    for name in ("mnist_model.h5", "mnist_model.tflite", "metrics.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    retrained = b"retrained" + (MODEL_DIR / "mnist_model.h5").read_bytes()
    (tmp_path / "mnist_model.h5").write_bytes(retrained)
    with pytest.raises(ModelLoadError, match="not exported from"):
        load_model(Settings(model_path=tmp_path / "mnist_model.h5", model_runtime="litert"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.tflite", None, "no such file"),
        ("garbage.tflite", b"not a flatbuffer", "not a valid LiteRT model"),
    ],
)
def test_unloadable_models_are_refused(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(Settings(model_path=path))


def test_tensorflow_runtime_agrees_with_litert(
    model: LiteRTModel, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    pytest.importorskip("tensorflow")
    tf_model = load_model(Settings(model_runtime="tensorflow"))
    assert tf_model.info.runtime == "tensorflow"
    digits = np.stack([normalize_digit(img).pixels for img in mnist[0][:64]])[..., None]
    litert = model.predict(digits[:32])
    keras = tf_model.predict(digits[:32])
    assert (litert.argmax(axis=1) == keras.argmax(axis=1)).mean() >= 0.97
    np.testing.assert_allclose(litert, keras, atol=0.05)


def test_the_model_card_is_rendered_from_its_metrics() -> None:
    from model import card

    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert (MODEL_DIR / "MODEL_CARD.md").read_text() == card.render(metrics)
