"""One table of per-layer facts that the engines rely on.

* Piecewise linearity (the factored engine is exact only through such layers).
* Second-order rules: Keras layers and activations whose TensorFlow autodiff
  gives wrong or missing second derivatives get an evaluation with the same
  values whose autodiff is exact. Keras' TensorFlow ``moments`` (used by
  LayerNormalization and GroupNormalization) takes the variance around
  ``stop_gradient(mean)``: first derivatives survive, second ones do not.
  ``softsign`` has no registered second-order gradient at all. Vectorized
  (``tf.vectorized_map``) second derivatives through MaxPool with overlapping,
  same-padded windows come out as zeros.

Which layers need a rule, and that each rule is right, is decided by the audit
(``pipeline.curvature.audit``) against float64 differences of function values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import keras
import tensorflow as tf

PIECEWISE_LINEAR_ACTIVATIONS = frozenset({"linear", "relu", "leaky_relu"})

_L = keras.layers
# Layers that are piecewise linear in their input in inference mode, whatever their settings.
PIECEWISE_LINEAR_LAYERS: tuple[type, ...] = (
    _L.InputLayer, _L.ReLU, _L.LeakyReLU, _L.Identity,
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
    _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
    _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
    _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
    _L.Flatten, _L.Reshape, _L.Permute, _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
    _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
    _L.Add, _L.Subtract, _L.Average, _L.Maximum, _L.Minimum, _L.Concatenate,
    _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D, _L.GaussianDropout,
    _L.BatchNormalization,
)
# Layers that are linear maps followed by their ``activation`` attribute.
AFFINE_LAYERS: tuple[type, ...] = (
    _L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D, _L.DepthwiseConv2D, _L.SeparableConv2D, _L.Activation,
)


def _exact_tf_moments(x, axes, keepdims=False):
    """``tf.nn.moments`` without its ``stop_gradient``: the same values, exact derivatives of every order."""
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
    """Within the block Keras' TensorFlow ``moments`` differentiates exactly to any order."""
    from keras.src.backend.tensorflow import nn as backend_nn

    saved = backend_nn._compute_moments
    backend_nn._compute_moments = _exact_tf_moments
    try:
        yield
    finally:
        backend_nn._compute_moments = saved


def _with_exact_moments(layer: keras.layers.Layer) -> Callable:
    original = type(layer).call

    def call(*args, **kwargs):
        with exact_moments():
            return original(layer, *args, **kwargs)

    return call


def softsign(x):
    """x / (1 + |x|), as autodiff-able ops: TensorFlow's Softsign op has no second-order gradient."""
    return x / (1 + tf.abs(x))


def window_maxima(x: tf.Tensor, pool: tuple, strides: tuple, padding: str) -> tuple[tf.Tensor, tf.Tensor]:
    """2-D max pooling of ``x`` and each window's argmax as a flat index into ``x`` (the first one on ties)."""
    return tf.nn.max_pool_with_argmax(x, [1, *pool, 1], [1, *strides, 1], padding.upper(), include_batch_in_index=True)


def _max_pool_by_gather(layer: keras.layers.Layer) -> Callable:
    """Max pooling as a gather of the input at each window's argmax (indices held constant): the same values.

    TensorFlow's vectorized Hessian-vector products through MaxPool with overlapping, same-padded
    windows come out as zeros; gathers differentiate exactly to any order, vectorized or not.
    """
    original = type(layer).call
    one_d = isinstance(layer, _L.MaxPooling1D)

    def call(inputs, *args, **kwargs):
        if layer.data_format != "channels_last":
            return original(layer, inputs, *args, **kwargs)
        x = inputs[:, None] if one_d else inputs
        pool, strides = ((1, *layer.pool_size), (1, *layer.strides)) if one_d else (layer.pool_size, layer.strides)
        _, argmax = window_maxima(tf.stop_gradient(x), pool, strides, layer.padding)
        pooled = tf.gather(tf.reshape(x, [-1]), argmax)
        return pooled[:, 0] if one_d else pooled

    return call


# Layer type -> (what the rule does, a function of the layer giving its replacement ``call``).
LAYER_RULES: dict[type, tuple[str, Callable[[keras.layers.Layer], Callable]]] = {
    _L.LayerNormalization: ("moments without stop_gradient", _with_exact_moments),
    _L.GroupNormalization: ("moments without stop_gradient", _with_exact_moments),
    _L.MaxPooling1D: ("gather at the argmax", _max_pool_by_gather),
    _L.MaxPooling2D: ("gather at the argmax", _max_pool_by_gather),
}
# Activation name -> (what the rule does, replacement function with the same values).
ACTIVATION_RULES: dict[str, tuple[str, Callable]] = {
    "softsign": ("x / (1 + abs(x)) as elementary ops", softsign),
}


def activation_name(layer) -> str | None:
    """The name of ``layer``'s ``activation`` attribute, or None when it has none."""
    activation = getattr(layer, "activation", None)
    if activation is None or isinstance(activation, keras.layers.Layer):
        return None
    return getattr(activation, "__name__", type(activation).__name__)


def is_keras_activation(name: str, fn) -> bool:
    """True when ``fn`` is Keras' own activation called ``name`` (not a custom function of that name)."""
    return getattr(keras.activations, name, None) is fn


def _activation_rule(layer) -> tuple[str, Callable] | None:
    """The rule for ``layer``'s own Keras activation, if it has one."""
    name = activation_name(layer)
    return ACTIVATION_RULES[name] if name in ACTIVATION_RULES and is_keras_activation(name, layer.activation) else None


def rule_for(layer: keras.layers.Layer) -> str | None:
    """What rule (if any) changes how ``layer`` is evaluated for second derivatives."""
    parts = []
    if type(layer) in LAYER_RULES:
        parts.append(LAYER_RULES[type(layer)][0])
    activation_rule = _activation_rule(layer)
    if activation_rule:
        parts.append(f"activation {activation_name(layer)}: {activation_rule[0]}")
    return "; ".join(parts) or None


@contextlib.contextmanager
def second_order_rules(layers) -> Iterator[None]:
    """Within the block ``layers`` evaluate through formulations whose autodiff is exact to second order.

    Values are unchanged; only how TensorFlow differentiates them changes.
    """
    patched_calls, patched_activations = [], []
    try:
        for layer in layers:
            if type(layer) in LAYER_RULES:
                layer.call = LAYER_RULES[type(layer)][1](layer)
                patched_calls.append(layer)
            rule = _activation_rule(layer)
            if rule:
                patched_activations.append((layer, layer.activation))
                layer.activation = rule[1]
        yield
    finally:
        for layer in patched_calls:
            del layer.call
        for layer, activation in patched_activations:
            layer.activation = activation


# Transposed Jacobians --------------------------------------------------------------------------
# For suffixes made only of these layers, the factored engine back-propagates all K factor columns of
# N examples as one (K, N, ...) batch: one large convolution or matrix product per layer, masks and
# routings computed once per example and shared by every column.


@dataclass(frozen=True)
class TransposeRule:
    """``forward(layer, x) -> (y, saved)`` evaluates the layer as the model does (inference mode) and
    keeps what its Jacobian needs; ``transpose(layer, saved, v, magnitude)`` maps output cotangents
    (K, N, ...) to input cotangents, through |Jᵀ| (every weight by its absolute value) when
    ``magnitude``: applied to positive cotangents that reaches, without cancellation, every input
    that any cotangent can reach. ``applies(layer)`` is False for settings the rule does not cover."""

    forward: Callable
    transpose: Callable
    applies: Callable = lambda layer: True


def _merged(v: tf.Tensor, fn: Callable) -> tf.Tensor:
    """Apply a batched op to (K, N, ...) by merging K and N into one batch axis."""
    k, n = tf.shape(v)[0], tf.shape(v)[1]
    out = fn(tf.reshape(v, tf.concat([[k * n], tf.shape(v)[2:]], 0)))
    return tf.reshape(out, tf.concat([[k, n], tf.shape(out)[1:]], 0))


def activation_slope(name: str | None, pre: tf.Tensor) -> tf.Tensor | None:
    """d activation / d pre as a mask for relu (the only other activation the rules take), None for the identity."""
    return None if name in (None, "linear") else tf.cast(pre > 0, pre.dtype)


def _masked(v: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    return v if mask is None else v * mask


def activation_has_transpose_rule(layer) -> bool:
    """True when ``layer``'s activation is Keras' relu or the identity."""
    name = activation_name(layer)
    return name in (None, "linear", "relu") and (name is None or is_keras_activation(name, layer.activation))


def _dense_forward(layer, x):
    pre = tf.tensordot(x, layer.kernel, axes=[[x.shape.rank - 1], [0]])
    pre = pre + layer.bias if layer.use_bias else pre
    return layer.activation(pre), activation_slope(activation_name(layer), pre)


def _weights(weights: tf.Tensor, magnitude: bool) -> tf.Tensor:
    return tf.abs(weights) if magnitude else weights


def _dense_transpose(layer, mask, v, magnitude=False):
    return tf.tensordot(_masked(v, mask), _weights(layer.kernel, magnitude), axes=[[v.shape.rank - 1], [1]])


def _conv_forward(layer, x):
    pre = layer.convolution_op(x, layer.kernel)
    pre = pre + layer.bias if layer.use_bias else pre
    return layer.activation(pre), (tf.shape(x)[1:], activation_slope(activation_name(layer), pre))


def _conv_transpose(layer, saved, v, magnitude=False):
    input_shape, mask = saved
    (sh, sw) = layer.strides
    return _merged(_masked(v, mask), lambda g: tf.nn.conv2d_transpose(
        g, _weights(layer.kernel, magnitude), tf.concat([tf.shape(g)[:1], input_shape], 0), [1, sh, sw, 1], layer.padding.upper()))


def _conv_applies(layer) -> bool:
    return (activation_has_transpose_rule(layer) and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last")


def _mask_transpose(layer, mask, v, magnitude=False):
    return _masked(v, mask)


def _activation_forward(layer, x):
    return layer.activation(x), activation_slope(activation_name(layer), x)


def _relu_forward(layer, x):
    return layer(x, training=False), activation_slope("relu", x)


def _relu_applies(layer) -> bool:
    return layer.max_value is None and not layer.negative_slope and not layer.threshold


def _windows_tile(layer) -> bool:
    """True when the pooling windows are disjoint and cover the input exactly."""
    (ph, pw), (sh, sw) = layer.pool_size, layer.strides
    height, width = layer.input.shape[1:3]
    return (sh, sw) == (ph, pw) and height is not None and width is not None and height % ph == 0 and width % pw == 0


def _max_pool_forward(layer, x):
    """The pooled values, and where each window's maximum is (the first one on ties, as MaxPoolGrad routes).

    Tiling windows keep it as a 0/1 mask over the input (routing is then one broadcast product),
    others as flat argmax indices."""
    y, argmax = window_maxima(x, layer.pool_size, layer.strides, layer.padding)
    if _windows_tile(layer):
        size = tf.cast(tf.reshape(tf.size(x), [1]), tf.int64)
        hits = tf.scatter_nd(tf.reshape(argmax, (-1, 1)), tf.ones(tf.size(argmax), x.dtype), size)
        return y, (tf.shape(x), tf.reshape(hits, tf.shape(x)))
    return y, (tf.shape(x), argmax)


def _max_pool_transpose(layer, saved, v, magnitude=False):
    """Route each cotangent to its window's maximum."""
    input_shape, where = saved
    k = tf.shape(v)[0]
    if _windows_tile(layer):
        (ph, pw) = layer.pool_size
        n, h, w, c = (tf.shape(v)[i] for i in range(1, 5))
        spread = tf.broadcast_to(v[:, :, :, None, :, None, :], tf.stack([k, n, h, ph, w, pw, c]))
        return tf.reshape(spread, tf.concat([[k], input_shape], 0)) * where
    routed = tf.math.unsorted_segment_sum(tf.transpose(tf.reshape(v, (k, -1))), tf.reshape(where, [-1]),
                                          tf.reduce_prod(input_shape))
    return tf.reshape(tf.transpose(routed), tf.concat([[k], input_shape], 0))


def _pool_applies(layer) -> bool:
    return layer.data_format == "channels_last"


def _avg_pool_transpose(layer, input_shape, v, magnitude=False):
    (ph, pw), (sh, sw) = layer.pool_size, layer.strides
    return _merged(v, lambda g: tf.raw_ops.AvgPoolGrad(
        orig_input_shape=tf.concat([tf.shape(g)[:1], input_shape], 0), grad=g, ksize=[1, ph, pw, 1],
        strides=[1, sh, sw, 1], padding=layer.padding.upper()))


def _global_avg_transpose(layer, input_shape, v, magnitude=False):
    k, n = tf.shape(v)[0], tf.shape(v)[1]
    per_example = tf.reshape(v, (k, n, 1, 1, input_shape[-1]))
    return tf.broadcast_to(per_example, tf.concat([[k, n], input_shape], 0)) / tf.cast(input_shape[0] * input_shape[1], v.dtype)


def _shape_forward(layer, x):
    """The layer's output, keeping its input's shape (per example) for the transpose."""
    return layer(x, training=False), tf.shape(x)[1:]


def _reshape_transpose(layer, input_shape, v, magnitude=False):
    return tf.reshape(v, tf.concat([tf.shape(v)[:2], input_shape], 0))


def _plain_forward(layer, x):
    """The layer's output, keeping nothing: its transpose needs no state (identities, sums of inputs)."""
    return layer(x, training=False), None


def _identity_transpose(layer, saved, v, magnitude=False):
    return v


def _batch_norm_forward(layer, x):
    scale = tf.math.rsqrt(layer.moving_variance + layer.epsilon)
    return layer(x, training=False), scale * layer.gamma if layer.scale else scale


def _batch_norm_applies(layer) -> bool:
    return layer.axis in (-1, len(layer.input.shape) - 1)


def _scale_transpose(layer, scale, v, magnitude=False):
    return v * _weights(scale, magnitude)


def _same_shapes(layer) -> bool:
    """True when a merge layer's inputs have equal shapes (no broadcasting)."""
    return len({tuple(t.shape) for t in layer.input}) == 1


def _add_transpose(layer, saved, v, magnitude=False):
    return [v] * len(layer.input)


def _subtract_transpose(layer, saved, v, magnitude=False):
    return [v, v if magnitude else -v]


def _average_transpose(layer, saved, v, magnitude=False):
    return [v / len(layer.input)] * len(layer.input)


def _concatenate_forward(layer, inputs):
    return layer(inputs, training=False), [tf.shape(t)[layer.axis] for t in inputs]


def _concatenate_transpose(layer, sizes, v, magnitude=False):
    """Split the cotangent along the joined axis (one further along: the leading axis holds the columns)."""
    return tf.split(v, tf.stack(sizes), axis=layer.axis if layer.axis < 0 else layer.axis + 1, num=len(sizes))


IDENTITY_RULE = TransposeRule(_plain_forward, _identity_transpose)
# Merge layers: ``forward`` takes the list of inputs, ``transpose`` returns one cotangent per input.
TRANSPOSE_RULES: dict[type, TransposeRule] = {
    _L.Dense: TransposeRule(_dense_forward, _dense_transpose, activation_has_transpose_rule),
    _L.Conv2D: TransposeRule(_conv_forward, _conv_transpose, _conv_applies),
    _L.Activation: TransposeRule(_activation_forward, _mask_transpose, activation_has_transpose_rule),
    _L.ReLU: TransposeRule(_relu_forward, _mask_transpose, _relu_applies),
    _L.MaxPooling2D: TransposeRule(_max_pool_forward, _max_pool_transpose, _pool_applies),
    _L.AveragePooling2D: TransposeRule(_shape_forward, _avg_pool_transpose, _pool_applies),
    _L.GlobalAveragePooling2D: TransposeRule(_shape_forward, _global_avg_transpose,
                                             lambda layer: _pool_applies(layer) and not layer.keepdims),
    _L.Flatten: TransposeRule(_shape_forward, _reshape_transpose),
    _L.Reshape: TransposeRule(_shape_forward, _reshape_transpose),
    _L.BatchNormalization: TransposeRule(_batch_norm_forward, _scale_transpose, _batch_norm_applies),
    _L.Add: TransposeRule(_plain_forward, _add_transpose, _same_shapes),
    _L.Subtract: TransposeRule(_plain_forward, _subtract_transpose, _same_shapes),
    _L.Average: TransposeRule(_plain_forward, _average_transpose, _same_shapes),
    _L.Concatenate: TransposeRule(_concatenate_forward, _concatenate_transpose,
                                  lambda layer: layer.axis % len(layer.output.shape) != 0),
    **{kind: IDENTITY_RULE for kind in (_L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D, _L.GaussianDropout,
                    _L.GaussianNoise, _L.Identity)},
}


def transpose_rule(layer) -> TransposeRule | None:
    """The rule that back-propagates column batches through ``layer``, if its type and settings have one."""
    rule = TRANSPOSE_RULES.get(type(layer))
    return rule if rule is not None and rule.applies(layer) else None
