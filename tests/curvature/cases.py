"""A table of small models shared by every engine test, with float64 brute-force references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature import float64_clone
from pipeline.losses import get_loss

L = keras.layers


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], keras.Model]
    layer: str
    loss: str
    from_logits: bool
    piecewise_linear: bool
    input_shape: tuple
    classes: int

    def model(self) -> keras.Model:
        keras.utils.set_random_seed(1)
        return self.build()

    def data(self, n: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, *self.input_shape)).astype("float32")
        if self.loss == "sparse_categorical_crossentropy":
            y = rng.integers(0, self.classes, n)
        elif self.loss == "categorical_crossentropy":
            y = np.eye(self.classes, dtype="float32")[rng.integers(0, self.classes, n)]
        else:
            y = rng.normal(size=(n, self.classes)).astype("float32")
        return x, y


def _cnn(activation, head=None, suffix=(), classes=5):
    def build():
        inp = keras.Input((6, 6, 2))
        h = L.Conv2D(3, 3, padding="same", activation="tanh", name="c1")(inp)
        h = L.Conv2D(4, 3, padding="same", activation=activation, name="target")(h)
        for layer in suffix:
            h = layer()(h)
        h = L.Flatten()(L.MaxPooling2D()(h))
        return keras.Model(inp, L.Dense(classes, activation=head, name="out")(h))

    return build


def _strided():
    inp = keras.Input((7, 7, 2))
    h = L.Conv2D(3, 3, strides=2, padding="valid", activation="relu", name="target")(inp)
    h = L.Conv2D(3, 2, dilation_rate=1, activation="relu")(h)
    return keras.Model(inp, L.Dense(4)(L.Flatten()(h)))


def _dilated_same():
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, dilation_rate=2, padding="same", activation="gelu", name="target")(inp)
    return keras.Model(inp, L.Dense(4)(L.GlobalAveragePooling2D()(h)))


def _mlp(activation):
    def build():
        return keras.Sequential(
            [keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(4, activation=activation, name="target"), L.Dense(3)]
        )

    return build


def _residual(activation):
    def build():
        inp = keras.Input((5, 5, 2))
        h = L.Conv2D(3, 3, padding="same", activation="relu", name="c1")(inp)
        t = L.Conv2D(3, 3, padding="same", activation=activation, name="target")(h)
        h = L.Add()([h, L.Conv2D(3, 1, activation=activation)(t)])
        h = L.BatchNormalization()(h)
        return keras.Model(inp, L.Dense(4)(L.Flatten()(h)))

    return build


def _layernorm():
    inp = keras.Input((6,))
    h = L.Dense(5, name="target")(inp)
    h = L.LayerNormalization()(h)
    return keras.Model(inp, L.Dense(3)(L.Activation("relu")(h)))


def _attention():
    inp = keras.Input((4, 3))
    h = L.Dense(4, name="target")(inp)
    h = L.MultiHeadAttention(num_heads=2, key_dim=2)(h, h)
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(h)))


CASES = [
    Case("cnn_maxpool_relu", _cnn("relu"), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 5),
    Case("cnn_softmax_head", _cnn("relu", head="softmax"), "target", "sparse_categorical_crossentropy", False, True, (6, 6, 2), 5),
    Case("cnn_onehot_mse", _cnn("relu", suffix=(lambda: L.Dropout(0.5),)), "target", "mse", False, True, (6, 6, 2), 5),
    Case("cnn_70_classes", _cnn("relu", classes=70), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 70),
    Case("cnn_gelu", _cnn("gelu"), "target", "categorical_crossentropy", True, False, (6, 6, 2), 5),
    Case("strided_valid", _strided, "target", "categorical_crossentropy", True, True, (7, 7, 2), 4),
    Case("dilated_same_gelu", _dilated_same, "target", "mse", False, False, (6, 6, 2), 4),
    Case("mlp_relu", _mlp("relu"), "target", "sparse_categorical_crossentropy", True, True, (5,), 3),
    Case("mlp_tanh", _mlp("tanh"), "target", "mse", False, False, (5,), 3),
    Case("residual_relu", _residual("relu"), "target", "sparse_categorical_crossentropy", True, True, (5, 5, 2), 4),
    Case("residual_gelu", _residual("gelu"), "target", "sparse_categorical_crossentropy", True, False, (5, 5, 2), 4),
    Case("layernorm", _layernorm, "target", "mse", False, False, (6,), 3),
    Case("attention", _attention, "target", "sparse_categorical_crossentropy", True, False, (4, 3), 3),
]
CASE_IDS = [c.name for c in CASES]


def brute_force(case: Case, model: keras.Model, x, y):
    """Float64 gradient and full-Hessian diagonal w.r.t. the kernel via nested tapes (no z-space)."""
    model64 = float64_clone(model)
    kernel = model64.get_layer(case.layer).kernel
    loss = get_loss(case.loss, case.from_logits)
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = tf.reduce_mean(loss.per_example(model64(x64, training=False), tf.constant(y)))
        grad = inner.gradient(value, kernel)
    hessian = outer.jacobian(grad, kernel)
    size = int(np.prod(kernel.shape))
    diag = np.diagonal(tf.reshape(hessian, (size, size)).numpy()).reshape(kernel.shape)
    return grad.numpy(), diag


def assert_close(actual, expected, rtol: float, what: str):
    """Scale-aware comparison that names the worst index when it fails."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    err = np.abs(actual - expected)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    assert err.max() <= rtol * scale + 1e-12, (
        f"{what}: max |diff| {err.max():.3e} at {worst} (actual {actual[worst]:.6e}, expected {expected[worst]:.6e}),"
        f" tolerance {rtol:.0e} x scale {scale:.3e}"
    )
