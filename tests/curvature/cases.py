"""A table of small models shared by every engine test, with float64 references from loss VALUES.

No reference here uses TensorFlow's second derivatives: they are wrong through
some Keras layers (LayerNormalization, GroupNormalization) and missing through
others (softsign), so an autodiff reference could agree with a wrong engine.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
from typing import Callable, NamedTuple

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


def _cnn_norms(*norms, activation="gelu"):
    def build():
        inp = keras.Input((6, 6, 2))
        h = L.Conv2D(4, 3, padding="same", activation=activation, name="target")(inp)
        for norm in norms:
            h = norm()(h)
        return keras.Model(inp, L.Dense(4)(L.Flatten()(h)))

    return build


def _attention_norms():
    """A transformer block: attention, residual, LayerNorm, MLP, GroupNorm over features."""
    inp = keras.Input((4, 6))
    t = L.Dense(6, name="target")(inp)
    h = L.LayerNormalization()(L.Add()([t, L.MultiHeadAttention(num_heads=2, key_dim=3)(t, t)]))
    h = L.GroupNormalization(groups=2)(L.Dense(6, activation="gelu")(h))
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(h)))


def _rmsnorm():
    inp = keras.Input((6,))
    h = L.RMSNormalization()(L.Dense(5, activation="tanh", name="target")(inp))
    return keras.Model(inp, L.Dense(3)(h))


def _transpose_zoo():
    """A chain through every transpose rule: eval BatchNorm with moving statistics, strided valid conv,
    ReLU layer, same-padded average and stride-1 max pooling, Dropout, Dense on positions, Reshape,
    global average pooling, an Activation layer and a softmax head."""
    inp = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="target")(inp)
    norm = L.BatchNormalization()
    h = L.ReLU()(L.Conv2D(4, 3, strides=2)(norm(h)))
    h = L.Dropout(0.5)(L.AveragePooling2D(2, padding="same")(h))
    h = L.MaxPooling2D(2, strides=1, padding="same")(L.Conv2D(3, 2, padding="same", activation="relu")(h))
    h = L.Reshape((2, 2, 3))(L.Dense(3, activation="relu")(L.Reshape((4, 3))(h)))
    h = L.Activation("relu")(L.Dense(6)(L.GlobalAveragePooling2D()(h)))
    model = keras.Model(inp, L.Dense(4, activation="softmax")(h))
    rng = np.random.default_rng(7)
    norm.moving_mean.assign(rng.normal(size=4))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, size=4))
    norm.gamma.assign(rng.uniform(0.5, 1.5, size=4))
    return model


def _merge_zoo():
    """A suffix with branches through every merge rule: Add of two paths from the target, Concatenate with a
    tensor computed beside the target, Subtract reusing the target's output, Average, then max pooling."""
    inp = keras.Input((6, 6, 2))
    t = L.Conv2D(4, 3, padding="same", activation="relu", name="target")(L.Conv2D(3, 3, padding="same", activation="tanh")(inp))
    side = L.Conv2D(2, 3, padding="same", activation="relu")(inp)
    u = L.Add()([t, L.Conv2D(4, 1)(t)])
    q = L.Conv2D(4, 3, padding="same")(L.Concatenate()([u, side]))
    h = L.Average()([L.Subtract()([q, t]), q])
    return keras.Model(inp, L.Dense(5)(L.Flatten()(L.MaxPooling2D()(h))))


CASES = [
    Case("cnn_maxpool_relu", _cnn("relu"), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 5),
    Case("cnn_softmax_head", _cnn("relu", head="softmax"), "target", "sparse_categorical_crossentropy", False, True, (6, 6, 2), 5),
    Case("cnn_onehot_mse", _cnn("relu", suffix=(lambda: L.Dropout(0.5),)), "target", "mse", False, True, (6, 6, 2), 5),
    Case("cnn_70_classes", _cnn("relu", classes=70), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 70),
    Case("cnn_gelu", _cnn("gelu"), "target", "categorical_crossentropy", True, False, (6, 6, 2), 5),
    Case("strided_valid", _strided, "target", "categorical_crossentropy", True, True, (7, 7, 2), 4),
    Case("dilated_same_gelu", _dilated_same, "target", "mse", False, False, (6, 6, 2), 4),
    Case("transpose_zoo", _transpose_zoo, "target", "sparse_categorical_crossentropy", False, True, (8, 8, 2), 4),
    Case("merge_zoo", _merge_zoo, "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 5),
    Case("mlp_relu", _mlp("relu"), "target", "sparse_categorical_crossentropy", True, True, (5,), 3),
    Case("mlp_tanh", _mlp("tanh"), "target", "mse", False, False, (5,), 3),
    Case("residual_relu", _residual("relu"), "target", "sparse_categorical_crossentropy", True, True, (5, 5, 2), 4),
    Case("residual_gelu", _residual("gelu"), "target", "sparse_categorical_crossentropy", True, False, (5, 5, 2), 4),
    Case("layernorm", _layernorm, "target", "mse", False, False, (6,), 3),
    Case("attention", _attention, "target", "sparse_categorical_crossentropy", True, False, (4, 3), 3),
    Case("cnn_gelu_layernorm", _cnn_norms(L.LayerNormalization), "target", "categorical_crossentropy", True, False, (6, 6, 2), 4),
    Case("cnn_groupnorm", _cnn_norms(lambda: L.GroupNormalization(groups=2), activation="silu"), "target", "mse", False, False,
         (6, 6, 2), 4),
    Case("cnn_groupnorm_layernorm", _cnn_norms(lambda: L.GroupNormalization(groups=2), L.LayerNormalization), "target",
         "sparse_categorical_crossentropy", True, False, (6, 6, 2), 4),
    Case("attention_layernorm_groupnorm", _attention_norms, "target", "sparse_categorical_crossentropy", True, False, (4, 6), 3),
    Case("mlp_softsign", _mlp("softsign"), "target", "mse", False, False, (5,), 3),
    Case("mlp_mish", _mlp("mish"), "target", "sparse_categorical_crossentropy", True, False, (5,), 3),
    Case("rmsnorm", _rmsnorm, "target", "mse", False, False, (6,), 3),
]
CASE_IDS = [c.name for c in CASES]


class Reference(NamedTuple):
    """Float64 derivatives from loss values; ``smooth`` is False where steps h and h/2 disagree (a kink)."""

    gradient: np.ndarray
    hessian_diagonal: np.ndarray
    smooth: np.ndarray


@functools.lru_cache(maxsize=None)
def value_reference(case: Case, n: int = 6, seed: int = 0, step: float = 3e-4) -> Reference:
    """Gradient and Hessian diagonal w.r.t. the kernel from float64 central differences of the mean loss,
    Richardson-extrapolated over steps h and h/2. Uses the case's own model and data."""
    model64 = float64_clone(case.model())
    x, y = case.data(n, seed)
    kernel = model64.get_layer(case.layer).kernel
    loss = get_loss(case.loss, case.from_logits)
    x64, labels = tf.constant(x, tf.float64), tf.constant(y)
    mean_loss = tf.function(lambda: tf.reduce_mean(loss.per_example(model64(x64, training=False), labels)))
    base = kernel.numpy()
    flat = base.ravel()
    f0 = float(mean_loss())

    def at(i, delta):
        shifted = flat.copy()
        shifted[i] += delta
        kernel.assign(shifted.reshape(base.shape))
        return float(mean_loss())

    grads, curvatures = [], []
    for i in range(flat.size):
        g, d = [], []
        for h in (step, step / 2):
            plus, minus = at(i, h), at(i, -h)
            g.append((plus - minus) / (2 * h))
            d.append((plus - 2 * f0 + minus) / h**2)
        grads.append(g)
        curvatures.append(d)
    kernel.assign(base)
    grads, curvatures = np.array(grads), np.array(curvatures)
    diagonal = (4 * curvatures[:, 1] - curvatures[:, 0]) / 3
    gap = np.abs(curvatures[:, 0] - curvatures[:, 1])
    scale = np.abs(diagonal[gap <= 1e-2 * np.abs(curvatures).max(axis=1)]).max(initial=0.0)  # kinks excluded
    smooth = gap <= 1e-5 * scale + 1e-7
    shape = base.shape
    gradient = (4 * grads[:, 1] - grads[:, 0]) / 3
    return Reference(gradient.reshape(shape), diagonal.reshape(shape), smooth.reshape(shape))


def assert_close(actual, expected, rtol: float, what: str, where=None):
    """Scale-aware comparison (at the entries ``where``, default all) that names the worst index when it fails."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    where = np.ones(expected.shape, bool) if where is None else np.asarray(where)
    assert where.mean() >= 0.9, f"{what}: only {where.mean():.0%} of the reference entries are smooth"
    scale = np.abs(expected).max()
    err = np.where(where, np.abs(actual - expected), 0.0)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    assert err.max() <= rtol * scale + 1e-12, (
        f"{what}: max |diff| {err.max():.3e} at {worst} (actual {actual[worst]:.6e}, expected {expected[worst]:.6e}),"
        f" tolerance {rtol:.0e} x scale {scale:.3e}"
    )
