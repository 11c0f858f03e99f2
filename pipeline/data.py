"""Data sources: seeded synthetic data, ``.npz`` files and scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import BadInputError
from pipeline.losses import Loss


def _labels_for(loss: Loss, classes_idx: np.ndarray, classes: int) -> np.ndarray:
    if loss.name == "sparse_categorical_crossentropy":
        return classes_idx.astype(np.int64)
    return np.eye(classes, dtype=np.float32)[classes_idx]


def _digits(input_shape: tuple, loss: Loss, classes: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    if int(np.prod(input_shape)) != 64:
        raise BadInputError(f"digits are 8x8 images (64 values) but the model expects inputs of shape {input_shape}")
    if classes != 10:
        raise BadInputError(f"digits have 10 classes but the model has {classes} outputs")
    return x.reshape((len(x), *input_shape)), _labels_for(loss, digits.target, classes)


def _npz(path: str):
    if not Path(path).is_file():
        raise BadInputError(f"data file {path!r} does not exist")
    with np.load(path) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise BadInputError(f"data file {path!r} lacks arrays {sorted(missing)}; it has {arrays.files}")
        return arrays["x"].astype(np.float32), arrays["y"]


def _synthetic(config: DataConfig, input_shape: tuple, loss: Loss, classes: int):
    rng = np.random.default_rng(config.seed)
    n = config.num_examples or 64
    x = rng.normal(size=(n, *input_shape)).astype(np.float32)
    if loss.name == "mse":
        return x, rng.normal(size=(n, classes)).astype(np.float32)
    return x, _labels_for(loss, rng.integers(0, classes, n), classes)


def load_data(config: DataConfig, input_shape: tuple, output_classes: int, loss: Loss) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for the model's input shape and output width, first ``num_examples`` only."""
    if config.source == "synthetic":
        return _synthetic(config, input_shape, loss, output_classes)
    x, y = _digits(input_shape, loss, output_classes) if config.source == "digits" else _npz(config.path)
    if config.num_examples is not None:
        x, y = x[: config.num_examples], y[: config.num_examples]
    return x, y
