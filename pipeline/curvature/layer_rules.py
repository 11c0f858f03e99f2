"""One table of per-layer facts that the engines rely on.

* Piecewise linearity (the factored engine is exact only through such layers).
* Second-order rules: Keras layers and activations whose TensorFlow autodiff
  gives wrong or missing second derivatives get an evaluation with the same
  values whose autodiff is exact. Keras' TensorFlow ``moments`` (used by
  LayerNormalization and GroupNormalization) takes the variance around
  ``stop_gradient(mean)``: first derivatives survive, second ones do not.
  ``softsign`` has no registered second-order gradient at all.

Which layers need a rule, and that each rule is right, is decided by the audit
(``pipeline.curvature.audit``) against float64 differences of function values.
"""

from __future__ import annotations

import contextlib
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


# Layer type -> (what the rule does, a function of the layer giving its replacement ``call``).
LAYER_RULES: dict[type, tuple[str, Callable[[keras.layers.Layer], Callable]]] = {
    _L.LayerNormalization: ("moments without stop_gradient", _with_exact_moments),
    _L.GroupNormalization: ("moments without stop_gradient", _with_exact_moments),
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
