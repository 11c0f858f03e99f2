"""Models: built-in seeded builders and saved ``.keras`` files, plus their fingerprint."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from pipeline.errors import BadInputError

L = keras.layers


def _vgg_block(h, filters: int, convs: int, block: int):
    for i in range(1, convs + 1):
        h = L.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}")(h)
    return L.MaxPooling2D(name=f"block{block}_pool")(h)


def digits_vgg() -> keras.Model:
    """VGG-style CNN for 8x8x1 digits; ``block2_conv1`` is 3x3x32x64 (18,432 entries)."""
    inp = keras.Input((8, 8, 1), name="image")
    h = _vgg_block(inp, 32, 2, 1)
    h = _vgg_block(h, 64, 2, 2)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(64, activation="relu", name="fc1")(h)
    return keras.Model(inp, L.Dense(10, activation="softmax", name="predictions")(h), name="digits_vgg")


def cifar_vgg(classes: int = 10) -> keras.Model:
    """CIFAR-size VGG: conv3->32, conv32->32, pool, block2_conv1 3x3x32x64, conv64->64, pool, linear->logits."""
    inp = keras.Input((32, 32, 3), name="image")
    h = _vgg_block(inp, 32, 2, 1)
    h = _vgg_block(h, 64, 2, 2)
    h = L.Flatten(name="flatten")(h)
    return keras.Model(inp, L.Dense(classes, name="logits")(h), name="cifar_vgg" if classes == 10 else f"cifar_vgg{classes}")


def cifar_vgg100() -> keras.Model:
    """``cifar_vgg`` with 100 classes (CIFAR-100 size)."""
    return cifar_vgg(100)


def vgg16() -> keras.Model:
    """``keras.applications.VGG16`` with seeded random weights, 224x224x3 inputs, 1000 classes."""
    return keras.applications.VGG16(weights=None, input_shape=(224, 224, 3), classes=1000)


def mlp_tanh() -> keras.Model:
    """Small tanh MLP for 8x8 digits flattened to 64 features (a non-piecewise-linear suffix)."""
    inp = keras.Input((64,), name="features")
    h = L.Dense(32, activation="tanh", name="dense1")(inp)
    h = L.Dense(32, activation="tanh", name="dense2")(h)
    return keras.Model(inp, L.Dense(10, name="logits")(h), name="mlp_tanh")


BUILDERS: dict[str, Callable[[], keras.Model]] = {
    "digits_vgg": digits_vgg,
    "cifar_vgg": cifar_vgg,
    "cifar_vgg100": cifar_vgg100,
    "vgg16": vgg16,
    "mlp_tanh": mlp_tanh,
}


def build_model(name: str, seed: int = 0, weights: str | None = None) -> keras.Model:
    """A built-in model with weights drawn from ``seed`` (or loaded from a weights file)."""
    if name not in BUILDERS:
        raise BadInputError(f"unknown model builder {name!r}; built-ins are: {', '.join(BUILDERS)}")
    # fresh layer-name counters: a second build in one process gets the same auto-generated names
    # (and so the same fingerprint) as the first build in a worker
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = BUILDERS[name]()
    if weights:
        if not Path(weights).is_file():
            raise BadInputError(f"weights file {weights!r} does not exist")
        model.load_weights(weights)
    return model


def import_custom_objects(paths: list[str]) -> dict[str, object]:
    """Resolve ``module:attribute`` strings into Keras custom objects."""
    objects = {}
    for path in paths:
        module_name, _, attribute = path.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise BadInputError(f"custom object {path!r} cannot be imported: {exc}") from exc
        objects[getattr(obj, "__name__", attribute)] = obj
    return objects


def load_keras_file(path: str, custom_objects: list[str] = ()) -> keras.Model:
    """Load a saved ``.keras`` model; custom layers are given as ``module:Name``."""
    if not Path(path).is_file():
        raise BadInputError(f"model file {path!r} does not exist")
    try:
        return keras.models.load_model(path, custom_objects=import_custom_objects(list(custom_objects)), compile=False)
    except (ValueError, TypeError, OSError) as exc:
        raise BadInputError(f"cannot load model file {path!r}: {exc}") from exc


def model_fingerprint(model: keras.Model) -> str:
    """sha256 of the architecture and every weight's bytes: equal iff the same function is computed."""
    digest = hashlib.sha256(json.dumps(model.to_json(), sort_keys=True).encode())
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()
