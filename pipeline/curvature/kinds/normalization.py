"""Normalizations as target kinds: the scale (gamma) and offset (beta) of BatchNormalization (inference
mode) and LayerNormalization. Their output z = gamma · x̂ + beta is affine in both: gamma's patches are
the normalized input x̂ (each channel its own group), beta's are ones."""

from __future__ import annotations

import math

import tensorflow as tf

from pipeline.errors import BadInputError
from pipeline.curvature.kinds.base import LayerKind, Stage, TargetWeight, bias_weight, flatten_positions, ones_patches, shape_of, weight


def _scale_weight(layer, name: str, dims: tuple[str, ...]) -> TargetWeight:
    """A per-channel scale: no features, every channel its own group (its patches differ per channel)."""
    shape = shape_of(getattr(layer, name))
    return TargetWeight(name, shape, tuple(range(len(shape))), 0, math.prod(shape), dims)


def _normalization_weights(layer, dims: tuple[str, ...]) -> dict[str, TargetWeight]:
    weights = {}
    if getattr(layer, "gamma", None) is not None:
        weights["gamma"] = _scale_weight(layer, "gamma", dims)
    if getattr(layer, "beta", None) is not None:
        weights["beta"] = bias_weight(layer, "beta", dims)
    return weights


def _affine(stage: Stage, x: tf.Tensor) -> tf.Tensor:
    """gamma · x + beta with the weights the layer has."""
    z = x * weight(stage.layer, "gamma", x) if "gamma" in stage.weights else x
    return z + weight(stage.layer, "beta", x) if "beta" in stage.weights else z


class BatchNormStage(Stage):
    """y = (x - moving mean) · gamma / sqrt(moving variance + eps) + beta, over the last axis."""

    def __init__(self, layer):
        super().__init__(layer, "", _normalization_weights(layer, ("channel",)))

    def _inverse_std(self, like):
        return tf.math.rsqrt(weight(self.layer, "moving_variance", like) + self.layer.epsilon)

    def normalized(self, u):
        return (u - weight(self.layer, "moving_mean", u)) * self._inverse_std(u)

    def _scale(self, like, magnitude=False):
        scale = self._inverse_std(like)
        return scale * weight(self.layer, "gamma", like, magnitude) if "gamma" in self.weights else scale

    def linear(self, u, magnitude=False):
        return u * (tf.abs(self._scale(u)) if magnitude else self._scale(u))

    def z(self, u):
        return _affine(self, self.normalized(u))

    def input_adjoint(self, g, input_shape, magnitude=False):
        return g * (tf.abs(self._scale(g)) if magnitude else self._scale(g))

    def patches(self, weight_name, u):
        if weight_name == "beta":
            return ones_patches(u)
        return flatten_positions(self.normalized(u))[..., None]


class LayerNormStage(Stage):
    """y = gamma · x̂ + beta with x̂ normalized over the layer's axes (its channels here, trailing)."""

    def __init__(self, layer):
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        rank = len(layer.input.shape) if any(a >= 0 for a in axes) else 0
        self.axes = sorted(a - rank if a >= 0 else a for a in axes)
        self.channel_axes = len(axes)
        if self.axes != list(range(-len(axes), 0)):
            raise BadInputError(f"layer {layer.name!r}: LayerNormalization over axes {layer.axis} can be a target only"
                                " when they are the last axes")
        dims = ("channel",) if len(axes) == 1 else tuple(f"axis{a}" for a in axes)
        super().__init__(layer, "", _normalization_weights(layer, dims))

    def normalized(self, u):
        layer = self.layer
        mean, variance = tf.nn.moments(u, self.axes, keepdims=True)
        if getattr(layer, "rms_scaling", False):
            return u * tf.math.rsqrt(variance + layer.epsilon)
        return (u - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def z(self, u):
        return _affine(self, self.normalized(u))

    def patches(self, weight_name, u):
        if weight_name == "beta":
            return ones_patches(u, self.channel_axes)
        return flatten_positions(self.normalized(u), self.channel_axes)[..., None]


def batch_norm_kind(layer) -> LayerKind:
    return LayerKind(layer, (BatchNormStage(layer),), activated=False)


def layer_norm_kind(layer) -> LayerKind:
    return LayerKind(layer, (LayerNormStage(layer),), activated=False)
