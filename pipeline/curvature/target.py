"""The target layer: its weight, its linear map, and a way to perturb its output.

The target layer computes z = linear(a, W) + b, then its activation. z is linear
in W, so every derivative w.r.t. W is a contraction of "patches" of the layer
input a with a derivative w.r.t. z. This module owns that contraction for each
supported layer type, and a context manager that replaces the layer's output by
``activation(z + delta)`` so engines can differentiate in z-space.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import keras
import numpy as np
import tensorflow as tf

from pipeline.errors import BadInputError


class _PrefixDone(Exception):
    """Raised inside the patched layer to stop the forward pass once its input is known."""


@dataclass(frozen=True)
class Target:
    """A Conv2D or Dense layer of a model and which of its weights is W."""

    model: keras.Model
    layer: keras.layers.Layer
    weight_name: str

    @property
    def variable(self) -> keras.Variable:
        return getattr(self.layer, self.weight_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.variable.shape)

    @property
    def out_channels(self) -> int:
        return self.shape[-1]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.layer, keras.layers.Conv2D)

    def pre_activation(self, a: tf.Tensor) -> tf.Tensor:
        """z = linear(a, W) + b, computed exactly as the layer does before its activation."""
        layer = self.layer
        if self.is_conv:
            z = layer.convolution_op(a, layer.kernel)
        else:
            z = tf.tensordot(a, layer.kernel, axes=[[a.shape.rank - 1], [0]])
        if layer.use_bias:
            z = z + layer.bias
        return z

    def patches(self, a: tf.Tensor) -> tf.Tensor:
        """(N, S, P) inputs seen by each of the S output positions; P = prod(W.shape[:-1]).

        dz[n, s, o] / dW[p, o] = patches[n, s, p], with p the C-order index of W[..., o].
        """
        layer = self.layer
        if not self.is_conv:
            return tf.reshape(a, (tf.shape(a)[0], -1, a.shape[-1]))
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        patches = tf.image.extract_patches(
            a,
            sizes=[1, kh, kw, 1],
            strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1],
            padding=layer.padding.upper(),
        )
        return tf.reshape(patches, (tf.shape(a)[0], -1, patches.shape[-1]))

    def input_patches(self, x: tf.Tensor) -> tf.Tensor:
        """``patches`` of the layer input for model input ``x`` (runs only the prefix)."""
        return self.patches(self.layer_input(x))

    def flat_output(self, z_like: tf.Tensor) -> tf.Tensor:
        """(N, S, C) view of a tensor shaped like z."""
        return tf.reshape(z_like, (tf.shape(z_like)[0], -1, z_like.shape[-1]))

    @contextlib.contextmanager
    def perturbed(self, delta_fn) -> Iterator[None]:
        """Within the block the layer returns ``activation(z + delta_fn(z))``."""
        layer = self.layer

        def call(inputs, *args, **kwargs):
            z = self.pre_activation(inputs)
            return layer.activation(z + delta_fn(z))

        layer.call = call
        try:
            yield
        finally:
            del layer.call

    def layer_input(self, x: tf.Tensor) -> tf.Tensor:
        """The target layer's input for model input ``x``; runs only the prefix."""
        layer = self.layer
        seen = []

        def call(inputs, *args, **kwargs):
            seen.append(inputs)
            raise _PrefixDone()

        layer.call = call
        try:
            self.model(x, training=False)
        except _PrefixDone:
            return seen[0]
        finally:
            del layer.call
        raise RuntimeError(f"layer {layer.name!r} was not called by the model's forward pass")


def layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers]


def resolve_target(model: keras.Model, layer_name: str, weight: str = "kernel") -> Target:
    """Find ``layer_name`` in ``model``; raise BadInputError listing what exists."""
    names = layer_names(model)
    if layer_name not in names:
        raise BadInputError(f"layer {layer_name!r} not found; layers are: {', '.join(names)}")
    layer = model.get_layer(layer_name)
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        raise BadInputError(
            f"layer {layer_name!r} is a {type(layer).__name__}; supported target layers are Conv2D and Dense"
        )
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise BadInputError(f"layer {layer_name!r} uses {layer.data_format}; only channels_last is supported")
    if getattr(layer, "groups", 1) != 1:
        raise BadInputError(f"layer {layer_name!r} is a grouped convolution; only groups=1 is supported")
    if weight != "kernel":
        weights = [w.path.split("/")[-1] for w in layer.weights]
        raise BadInputError(
            f"weight {weight!r} of layer {layer_name!r} is not supported; its weights are {weights},"
            " and derivatives are computed for 'kernel'"
        )
    return Target(model=model, layer=layer, weight_name=weight)


def channel_slice(target: Target, out_channels: slice | None) -> slice:
    """Normalize and check a slice of output channels of ``target``."""
    total = target.out_channels
    if out_channels is None:
        return slice(0, total)
    start, stop, step = out_channels.indices(total)
    requested = (out_channels.start, out_channels.stop)
    if step != 1 or start >= stop or any(v is not None and not 0 <= v <= total for v in requested):
        raise BadInputError(
            f"out_channels {out_channels} is not a non-empty contiguous range within [0, {total})"
            f" for layer {target.layer.name!r}"
        )
    return slice(start, stop)


def kernel_shape_of(target: Target, channels: slice) -> tuple[int, ...]:
    return target.shape[:-1] + (channels.stop - channels.start,)


def as_kernel(flat: np.ndarray, target: Target, channels: slice) -> np.ndarray:
    """(P, O) -> W.shape[:-1] + (O,)."""
    return np.asarray(flat).reshape(kernel_shape_of(target, channels))
