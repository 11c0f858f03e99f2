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
from pipeline.curvature.finite_diff import frozen_decision_derivatives
from pipeline.curvature.suffix import check_suffix
from pipeline.curvature.target import resolve_target
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
    weight: str = "kernel"
    tokens: int = 0  # integer inputs below this (an Embedding's vocabulary) instead of normal ones

    def model(self) -> keras.Model:
        keras.utils.set_random_seed(1)
        model = self.build()
        rng = np.random.default_rng(7)
        for w in model.weights:  # biases, offsets and normalization statistics away from their initial values
            if any(key in w.path for key in ("bias", "beta", "moving_mean")):
                w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))
            elif any(key in w.path for key in ("gamma", "moving_variance")):
                w.assign(rng.uniform(0.5, 1.5, size=w.shape).astype("float32"))
        return model

    def data(self, n: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        if self.tokens:
            x = rng.integers(0, self.tokens, size=(n, *self.input_shape)).astype("int32")
        else:
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
    global average pooling keeping its dimensions (as in MobileNet), an Activation layer and a softmax head."""
    inp = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="target")(inp)
    norm = L.BatchNormalization()
    h = L.ReLU()(L.Conv2D(4, 3, strides=2)(norm(h)))
    h = L.Dropout(0.5)(L.AveragePooling2D(2, padding="same")(h))
    h = L.MaxPooling2D(2, strides=1, padding="same")(L.Conv2D(3, 2, padding="same", activation="relu")(h))
    h = L.Reshape((2, 2, 3))(L.Dense(3, activation="relu")(L.Reshape((4, 3))(h)))
    h = L.Activation("relu")(L.Dense(6)(L.Flatten()(L.GlobalAveragePooling2D(keepdims=True)(h))))
    model = keras.Model(inp, L.Dense(4, activation="softmax")(h))
    rng = np.random.default_rng(7)
    norm.moving_mean.assign(rng.normal(size=4))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, size=4))
    norm.gamma.assign(rng.uniform(0.5, 1.5, size=4))
    return model


def _merge_zoo():
    """A suffix with branches through every merge rule: Add of two paths from the target, Concatenate with a
    tensor computed beside the target, Subtract reusing the target's output, Average, InceptionResNetV2's residual
    scaling (negative here, for the magnitudes), then max pooling."""
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    inp = keras.Input((6, 6, 2))
    t = L.Conv2D(4, 3, padding="same", activation="relu", name="target")(L.Conv2D(3, 3, padding="same", activation="tanh")(inp))
    side = L.Conv2D(2, 3, padding="same", activation="relu")(inp)
    u = L.Add()([t, L.Conv2D(4, 1)(t)])
    q = L.Conv2D(4, 3, padding="same")(L.Concatenate()([u, side]))
    h = CustomScaleLayer(-0.3)([L.Average()([L.Subtract()([q, t]), q]), q])
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


def _head(h, classes):
    return L.Dense(classes, name="head")(L.Flatten()(h))


def _conv1d_causal():
    inp = keras.Input((9, 2))
    h = L.Conv1D(3, 3, padding="causal", dilation_rate=2, activation="relu", name="target")(inp)
    return keras.Model(inp, _head(L.MaxPooling1D(2)(L.ZeroPadding1D(1)(h)), 4))


def _conv3d():
    inp = keras.Input((4, 4, 4, 2))
    h = L.Conv3D(3, 2, padding="same", activation="relu", name="target")(inp)
    return keras.Model(inp, _head(L.Cropping3D(1)(L.UpSampling3D(1)(h)), 3))


def _grouped():
    inp = keras.Input((5, 5, 4))
    h = L.Conv2D(4, 3, groups=2, padding="same", activation="relu", name="target")(inp)
    return keras.Model(inp, _head(L.Flatten()(L.GlobalMaxPooling2D(keepdims=True)(h)), 4))


def _depthwise(one_d=False):
    def build():
        inp = keras.Input((7, 3) if one_d else (6, 6, 3))
        kind = L.DepthwiseConv1D if one_d else L.DepthwiseConv2D
        h = kind(3, depth_multiplier=2, padding="same", name="target")(inp)
        h = L.ReLU(max_value=6.0)(L.BatchNormalization()(h))
        pool = L.GlobalAveragePooling1D() if one_d else L.AveragePooling2D(2)
        return keras.Model(inp, _head(pool(h), 4))

    return build


def _separable(one_d=False):
    def build():
        inp = keras.Input((8, 2) if one_d else (6, 6, 2))
        kind = L.SeparableConv1D if one_d else L.SeparableConv2D
        h = kind(3, 3, depth_multiplier=2, activation="relu", name="target")(inp)
        return keras.Model(inp, _head(L.Rescaling(0.5, offset=0.1)(h), 4))

    return build


def _conv_transpose():
    inp = keras.Input((3, 3, 2))
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu", name="target")(inp)
    h = L.Conv2D(2, 3, activation="relu")(L.UpSampling2D(2)(L.Cropping2D(1)(h)))
    return keras.Model(inp, _head(h, 4))


def _conv_transpose_1d():
    inp = keras.Input((4, 2))
    h = L.Conv1DTranspose(3, 3, strides=2, activation="relu", name="target")(inp)
    return keras.Model(inp, _head(h, 3))


def _dense_sequence():
    inp = keras.Input((4, 5))
    h = L.Dense(3, activation="relu", name="target")(inp)
    return keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling1D()(h)))


def _attention_projection():
    inp = keras.Input((3, 4))
    h = L.MultiHeadAttention(num_heads=2, key_dim=2, name="mha")(inp, inp)
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(h)))


def _embedding():
    inp = keras.Input((5,), dtype="int32")
    h = L.Embedding(7, 3, name="target")(inp)
    return keras.Model(inp, L.Dense(4, name="head")(L.Flatten()(L.ReLU()(L.Dense(3)(h)))))


def _batch_norm():
    inp = keras.Input((4, 4, 3))
    h = L.BatchNormalization(name="target")(L.Conv2D(3, 2, activation="relu")(inp))
    return keras.Model(inp, _head(L.MaxPooling2D()(L.ReLU()(h)), 4))


def _layer_norm():
    inp = keras.Input((4, 5))
    h = L.LayerNormalization(name="target")(L.Dense(5, activation="tanh")(inp))
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(L.ReLU()(h))))


def _nested():
    """A target two models deep: a Sequential inside a Functional inside the model."""
    inner = keras.Sequential([keras.Input((5, 5, 3)), L.Conv2D(3, 3, padding="same", activation="relu", name="conv")], name="inner")
    inp = keras.Input((5, 5, 2))
    middle_in = keras.Input((5, 5, 3))
    middle = keras.Model(middle_in, L.MaxPooling2D()(inner(middle_in)), name="middle")
    h = middle(L.Conv2D(3, 1, name="stem")(inp))
    return keras.Model(inp, _head(h, 4))


def _ops_zoo():
    """``keras.ops`` calls after the target: a hard sigmoid spelled with ops, a scaled residual, a mean and a reshape."""
    inp = keras.Input((4, 4, 2))
    t = L.Conv2D(3, 3, padding="same", name="target")(inp)
    gate = keras.ops.relu6(t + 3.0) * (1.0 / 6.0)
    h = keras.ops.concatenate([gate - 0.5, keras.ops.maximum(t, 0.0)], axis=-1)
    h = keras.ops.reshape(keras.ops.mean(h, axis=1), (-1, 24))
    return keras.Model(inp, L.Dense(4, name="head")(h))


# One case per target kind (and nested models, keras.ops nodes): (name, builder, layer path, weight, loss, from_logits,
# piecewise linear, input shape, classes, tokens)
KIND_CASES = [
    Case("conv1d_causal", _conv1d_causal, "target", "sparse_categorical_crossentropy", True, True, (9, 2), 4),
    Case("conv1d_causal_bias", _conv1d_causal, "target", "sparse_categorical_crossentropy", True, True, (9, 2), 4, "bias"),
    Case("conv3d", _conv3d, "target", "mse", False, True, (4, 4, 4, 2), 3),
    Case("grouped_conv2d", _grouped, "target", "sparse_categorical_crossentropy", True, True, (5, 5, 4), 4),
    Case("depthwise2d", _depthwise(), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 3), 4),
    Case("depthwise2d_bias", _depthwise(), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 3), 4, "bias"),
    Case("depthwise1d", _depthwise(True), "target", "mse", False, True, (7, 3), 4),
    Case("separable2d_depthwise", _separable(), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 4,
         "depthwise_kernel"),
    Case("separable2d_pointwise", _separable(), "target", "sparse_categorical_crossentropy", True, True, (6, 6, 2), 4,
         "pointwise_kernel"),
    Case("separable1d_depthwise", _separable(True), "target", "mse", False, True, (8, 2), 4, "depthwise_kernel"),
    Case("conv2d_transpose", _conv_transpose, "target", "sparse_categorical_crossentropy", True, True, (3, 3, 2), 4),
    Case("conv1d_transpose_bias", _conv_transpose_1d, "target", "mse", False, True, (4, 2), 3, "bias"),
    Case("dense_sequence", _dense_sequence, "target", "sparse_categorical_crossentropy", True, True, (4, 5), 4),
    Case("mha_query", _attention_projection, "mha/query", "sparse_categorical_crossentropy", True, False, (3, 4), 3),
    Case("mha_output_bias", _attention_projection, "mha/attention_output", "mse", False, False, (3, 4), 3, "bias"),
    Case("embedding", _embedding, "target", "sparse_categorical_crossentropy", True, True, (5,), 4, "embeddings", 7),
    Case("batch_norm_gamma", _batch_norm, "target", "sparse_categorical_crossentropy", True, True, (4, 4, 3), 4, "gamma"),
    Case("batch_norm_beta", _batch_norm, "target", "sparse_categorical_crossentropy", True, True, (4, 4, 3), 4, "beta"),
    Case("layer_norm_gamma", _layer_norm, "target", "sparse_categorical_crossentropy", True, True, (4, 5), 3, "gamma"),
    Case("nested_conv", _nested, "middle/inner/conv", "sparse_categorical_crossentropy", True, True, (5, 5, 2), 4),
    Case("ops_zoo", _ops_zoo, "target", "sparse_categorical_crossentropy", True, True, (4, 4, 2), 4),
]
KIND_IDS = [c.name for c in KIND_CASES]


class Reference(NamedTuple):
    """Float64 derivatives from loss values; ``smooth`` is False where steps h and h/2 disagree (a kink)."""

    gradient: np.ndarray
    hessian_diagonal: np.ndarray
    smooth: np.ndarray


@functools.lru_cache(maxsize=None)
def value_reference(case: Case, n: int = 6, seed: int = 0, step: float = 3e-4) -> Reference:
    """Gradient and Hessian diagonal w.r.t. the case's weight from float64 central differences of the mean loss,
    Richardson-extrapolated over steps h and h/2. Uses the case's own model and data."""
    model64 = float64_clone(case.model())
    x, y = case.data(n, seed)
    kernel = resolve_target(model64, case.layer, case.weight).variable
    loss = get_loss(case.loss, case.from_logits)
    x64, labels = tf.constant(x, tf.float64 if not case.tokens else tf.int32), tf.constant(y)
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


@functools.lru_cache(maxsize=None)
def frozen_reference(case: Case, n: int = 6, seed: int = 0) -> Reference:
    """Every entry's gradient and Hessian diagonal from float64 value differences of the frozen-decision loss (every
    ReLU mask and max-pool routing held at the unperturbed point): for piecewise-linear suffixes, smooth everywhere."""
    model = case.model()
    x, y = case.data(n, seed)
    target = resolve_target(model, case.layer, case.weight)
    indices = list(np.ndindex(target.shape))
    reference = frozen_decision_derivatives(model, case.layer, indices, loss=case.loss, from_logits=case.from_logits,
                                            weight=case.weight, peel_softmax=check_suffix(target, get_loss(case.loss, case.from_logits)).peel_softmax,
                                            batches=lambda: [(x, y)])
    return Reference(*(np.asarray(values).reshape(target.shape) for values in reference))


def reference(case: Case, n: int = 6, seed: int = 0) -> Reference:
    """The float64 reference for a case: the frozen-decision function's differences where its suffix is piecewise
    linear (plain differences straddle kinks there: on ``transpose_zoo`` they are off by 3.4e-5 of the largest
    entry where the smoothness test passes), plain loss-value differences elsewhere."""
    return frozen_reference(case, n, seed) if case.piecewise_linear else value_reference(case, n, seed)


def assert_close(actual, expected, rtol: float, what: str, where=None):
    """Comparison at the entries ``where`` (default all), with the tolerance scaled by the largest of those entries only
    (a kink's finite difference is no scale), naming the worst index when it fails."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    where = np.ones(expected.shape, bool) if where is None else np.asarray(where)
    assert where.mean() >= 0.9, f"{what}: only {where.mean():.0%} of the reference entries are smooth"
    scale = np.abs(expected[where]).max()
    err = np.where(where, np.abs(actual - expected), 0.0)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    assert err.max() <= rtol * scale + 1e-12, (
        f"{what}: max |diff| {err.max():.3e} at {worst} (actual {actual[worst]:.6e}, expected {expected[worst]:.6e}),"
        f" tolerance {rtol:.0e} x scale {scale:.3e}"
    )
