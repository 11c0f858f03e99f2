"""Convolutions as target kinds: Conv1D/2D/3D (any groups), depthwise, separable and transposed convolutions.

Patches come from ``tf.image.extract_patches`` for one and two spatial dimensions (a copy, no
arithmetic) and, elsewhere, from the layer's own linear map applied with an identity kernel
(one output channel per kernel entry), so they follow the layer's padding, strides and dilation
exactly, whatever they are.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from pipeline.curvature.kinds.base import LayerKind, Stage, TargetWeight, bias_weight, flatten_positions, ones_patches, shape_of, weight

SPATIAL = {1: ("k",), 2: ("kh", "kw"), 3: ("kd", "kh", "kw")}


def _spatial_names(rank: int) -> tuple[str, ...]:
    return SPATIAL[rank]


def window_patches(u: tf.Tensor, kernel_size, strides, dilation, padding: str) -> tf.Tensor:
    """(N, S, K·C) inputs of every window of a 1-D or 2-D channels-last input, in the kernel's (taps, channel) order."""
    if len(kernel_size) == 1:
        u = u[:, None]
        kernel_size, strides, dilation = (1, *kernel_size), (1, *strides), (1, *dilation)
    patches = tf.image.extract_patches(u, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1], rates=[1, *dilation, 1],
                                       padding=padding.upper())
    return tf.reshape(patches, (tf.shape(u)[0], -1, patches.shape[-1]))


def identity_kernel(taps: tuple[int, ...], channels: int, dtype) -> tf.Tensor:
    """A kernel (taps..., channels, taps·channels) whose output channel j copies the input at entry j."""
    size = math.prod(taps) * channels
    return tf.reshape(tf.eye(size, dtype=dtype), (*taps, channels, size))


def _grouped(patches: tf.Tensor, taps: int, groups: int) -> tf.Tensor:
    """(N, S, K·C) window patches -> (N, S, G, K·C/G): each group's input channels, in its kernel's order."""
    n, s, depth = tf.shape(patches)[0], tf.shape(patches)[1], patches.shape[-1]
    per_group = depth // taps // groups
    grouped = tf.reshape(patches, (n, s, taps, groups, per_group))
    return tf.reshape(tf.transpose(grouped, (0, 1, 3, 2, 4)), (n, s, groups, taps * per_group))


class _ConvLike(Stage):
    """Shared geometry of the convolution stages: rank, kernel size, strides, dilation, padding."""

    def __init__(self, layer, name, weights):
        super().__init__(layer, name, weights)
        self.rank = len(layer.kernel_size)
        self.taps = math.prod(layer.kernel_size)

    def positions(self, u: tf.Tensor) -> int:
        shape = self.layer.compute_output_shape(tuple(u.shape))
        return math.prod(int(d) for d in shape[1:-1])

    def bias_patches(self, u: tf.Tensor) -> tf.Tensor:
        n = tf.shape(u)[0]
        return tf.ones(tf.stack([n, self.positions(u), 1, 1]), u.dtype)


class ConvStage(_ConvLike):
    """z = conv(u, W) + b for Conv1D/2D/3D, including grouped convolutions and Conv1D's causal padding."""

    def __init__(self, layer):
        kernel = shape_of(layer.kernel)
        rank = len(layer.kernel_size)
        weights = {"kernel": TargetWeight("kernel", kernel, tuple(range(rank + 2)), rank + 1, layer.groups,
                                          (*_spatial_names(rank), "in_channel", "out_channel"))}
        if layer.use_bias:
            weights["bias"] = bias_weight(layer)
        super().__init__(layer, "", weights)

    def _input(self, u: tf.Tensor) -> tuple[tf.Tensor, str]:
        layer = self.layer
        if layer.padding == "causal":
            return tf.pad(u, layer._compute_causal_padding()), "valid"
        return u, layer.padding

    def linear(self, u, magnitude=False, kernel=None):
        padded, padding = self._input(u)
        kernel = weight(self.layer, "kernel", u, magnitude) if kernel is None else kernel
        return tf.nn.convolution(padded, kernel, strides=list(self.layer.strides), padding=padding.upper(),
                                 dilations=list(self.layer.dilation_rate))

    def patches(self, weight_name, u):
        if weight_name == "bias":
            return self.bias_patches(u)
        layer = self.layer
        padded, padding = self._input(u)
        if self.rank <= 2:
            flat = window_patches(padded, layer.kernel_size, layer.strides, layer.dilation_rate, padding)
            return _grouped(flat, self.taps, layer.groups)
        per_group = int(u.shape[-1]) // layer.groups
        identity = identity_kernel(tuple(layer.kernel_size), per_group, u.dtype)
        identity = tf.tile(identity, [1] * (self.rank + 1) + [layer.groups])
        out = self.linear(u, kernel=identity)
        n = tf.shape(u)[0]
        return tf.reshape(out, (n, -1, layer.groups, self.taps * per_group))


class DepthwiseStage(_ConvLike):
    """z = depthwise(u, W) (+ b): channel c·M + m of z sees only input channel c (M = the depth multiplier)."""

    def __init__(self, layer, kernel_name: str = "kernel", with_bias: bool = True, name: str = ""):
        kernel = shape_of(getattr(layer, kernel_name))
        rank = len(layer.kernel_size)
        weights = {kernel_name: TargetWeight(kernel_name, kernel, tuple(range(rank + 2)), rank, kernel[-2],
                                             (*_spatial_names(rank), "in_channel", "multiplier"))}
        if with_bias and layer.use_bias:
            weights["bias"] = bias_weight(layer)
        self.kernel_name = kernel_name
        super().__init__(layer, name, weights)

    def linear(self, u, magnitude=False):
        layer = self.layer
        return keras.ops.depthwise_conv(u, weight(layer, self.kernel_name, u, magnitude), strides=layer.strides,
                                        padding=layer.padding, dilation_rate=layer.dilation_rate)

    def patches(self, weight_name, u):
        if weight_name == "bias":
            return self.bias_patches(u)
        layer = self.layer
        flat = window_patches(u, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
        channels = int(u.shape[-1])
        n, s = tf.shape(flat)[0], tf.shape(flat)[1]
        return tf.transpose(tf.reshape(flat, (n, s, self.taps, channels)), (0, 1, 3, 2))  # (N, S, C, K)


class PointwiseStage(Stage):
    """The pointwise half of a separable convolution: z = conv1x1(u, W_p) + b on the depthwise output u."""

    def __init__(self, layer):
        kernel = shape_of(layer.pointwise_kernel)
        rank = len(kernel) - 2
        weights = {"pointwise_kernel": TargetWeight("pointwise_kernel", kernel, tuple(range(rank + 2)), rank + 1, 1,
                                                    (*(f"p{n}" for n in _spatial_names(rank)), "in_channel", "out_channel"))}
        if layer.use_bias:
            weights["bias"] = bias_weight(layer)
        super().__init__(layer, "pointwise", weights)

    def linear(self, u, magnitude=False):
        return keras.ops.conv(u, weight(self.layer, "pointwise_kernel", u, magnitude), strides=1, padding="valid")

    def patches(self, weight_name, u):
        flat = flatten_positions(u)
        if weight_name == "bias":
            return ones_patches(flat)
        return flat[:, :, None, :]


class ConvTransposeStage(_ConvLike):
    """z = conv_transpose(u, W) + b; W is (taps..., out_channel, in_channel), so its shard axis is the second last."""

    def __init__(self, layer):
        kernel = shape_of(layer.kernel)
        rank = len(layer.kernel_size)
        perm = (*range(rank), rank + 1, rank)
        weights = {"kernel": TargetWeight("kernel", kernel, perm, rank + 1, 1,
                                          (*_spatial_names(rank), "out_channel", "in_channel"))}
        if layer.use_bias:
            weights["bias"] = bias_weight(layer)
        super().__init__(layer, "", weights)

    def linear(self, u, magnitude=False, kernel=None):
        layer = self.layer
        kernel = weight(layer, "kernel", u, magnitude) if kernel is None else kernel
        return keras.ops.conv_transpose(u, kernel, strides=list(layer.strides), padding=layer.padding,
                                        output_padding=layer.output_padding, dilation_rate=layer.dilation_rate)

    def patches(self, weight_name, u):
        if weight_name == "bias":
            return self.bias_patches(u)
        channels = int(u.shape[-1])
        taps = tuple(self.layer.kernel_size)
        identity = tf.transpose(identity_kernel(taps, channels, u.dtype), (*range(self.rank), self.rank + 1, self.rank))
        out = self.linear(u, kernel=identity)  # channel j = (tap, input channel) of the kernel
        return flatten_positions(out)[:, :, None, :]


def conv_kind(layer) -> LayerKind:
    return LayerKind(layer, (ConvStage(layer),))


def depthwise_kind(layer) -> LayerKind:
    return LayerKind(layer, (DepthwiseStage(layer),))


def separable_kind(layer) -> LayerKind:
    return LayerKind(layer, (DepthwiseStage(layer, "depthwise_kernel", with_bias=False, name="depthwise"), PointwiseStage(layer)))


def conv_transpose_kind(layer) -> LayerKind:
    return LayerKind(layer, (ConvTransposeStage(layer),))

