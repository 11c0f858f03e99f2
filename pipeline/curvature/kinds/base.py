"""What every target kind provides: a layer as a chain of affine stages, how each weight enters its stage, adjoints.

A layer computes its output through one or more affine *stages* and then its activation: a
Conv2D has one, z = conv(a, W) + b; a SeparableConv2D two, the depthwise output u = dw(a, W_d) and
the pointwise pre-activation z = pw(u, W_p) + b. For a weight W of a stage,

    z[n, s, o] = Σ_f patches[n, s, g(o), f] · W_c[f, o] + (terms free of W),

with z viewed as (examples N, positions S, channels O), W_c = W.transpose(perm) reshaped to
(features F, channels O), and g(o) = o // (O / G) the group of channel o (G = 1 for a plain
convolution or dense layer, the input channels for a depthwise one, O for a normalization's scale).
That one formula gives every engine what it needs: the gradient (patches contracted with dL/dz),
the z-direction of an entry (the patches at f placed in channel o), and per-example weight
gradients of back-propagated columns (patches contracted with each column). z is affine in W, so
H_W = J_zᵀ H_z J_z exactly. A stage's adjoint with respect to its input back-propagates columns
through the layer when it sits after a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class TargetWeight:
    """How weight ``name`` of a layer enters its stage's z.

    ``perm`` orders W's axes as (feature axes..., channel axes...), the channel axes in the
    order they flatten into z's channels; the first channel axis is the one shards split.
    ``one_hot``: the patches are one-hot codes over the features (``patches.OneHotPatches``).
    """

    name: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    features: int
    groups: int
    dims: tuple[str, ...]
    one_hot: bool = False

    @property
    def shard_axis(self) -> int:
        """The axis of W along which work units and stored chunks split."""
        return self.perm[self.features]

    @property
    def channels(self) -> int:
        """Length of the shard axis."""
        return self.shape[self.shard_axis]

    @property
    def feature_count(self) -> int:
        return math.prod(self.shape[a] for a in self.perm[: self.features])

    @property
    def z_channels_per_channel(self) -> int:
        """z channels spanned by one index of the shard axis (a depthwise kernel's multiplier, else 1)."""
        return math.prod(self.shape[a] for a in self.perm[self.features + 1:])

    @property
    def entries(self) -> int:
        return math.prod(self.shape)

    def z_channels(self, channels: slice) -> slice:
        """The z channels of shard-axis indices ``channels``."""
        m = self.z_channels_per_channel
        return slice(channels.start * m, channels.stop * m)

    def to_weight(self, canonical, channels: slice) -> np.ndarray:
        """(F, O') values of the z channels of ``channels`` -> W's shape restricted to ``channels`` on the shard axis."""
        permuted = [self.shape[a] for a in self.perm]
        permuted[self.features] = channels.stop - channels.start
        return np.asarray(canonical).reshape(permuted).transpose(np.argsort(self.perm))

    def flat_position(self, index: tuple[int, ...]) -> tuple[int, int]:
        """(feature f, z channel o) of a multi-index of W."""
        permuted = tuple(int(index[a]) for a in self.perm)
        feature_shape = [self.shape[a] for a in self.perm[: self.features]]
        channel_shape = [self.shape[a] for a in self.perm[self.features:]]
        f = int(np.ravel_multi_index(permuted[: self.features], feature_shape)) if feature_shape else 0
        return f, int(np.ravel_multi_index(permuted[self.features:], channel_shape))


def shape_of(variable) -> tuple[int, ...]:
    return tuple(int(d) for d in variable.shape)


def flatten_positions(z: tf.Tensor, channel_axes: int = 1) -> tf.Tensor:
    """(N, S, O) view of a tensor whose last ``channel_axes`` axes are channels."""
    channels = math.prod(int(d) for d in z.shape[z.shape.rank - channel_axes:])
    return tf.reshape(z, (tf.shape(z)[0], -1, channels))


def merged(v: tf.Tensor, fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Apply a batched op to (K, N, ...) by merging K and N into one batch axis."""
    k, n = tf.shape(v)[0], tf.shape(v)[1]
    out = fn(tf.reshape(v, tf.concat([[k * n], tf.shape(v)[2:]], 0)))
    return tf.reshape(out, tf.concat([[k, n], tf.shape(out)[1:]], 0))


def linear_adjoint(linear: Callable[[tf.Tensor], tf.Tensor], input_shape, cotangent: tf.Tensor) -> tf.Tensor:
    """Jᵀ g of a linear map of its (batched) input, by reverse-mode autodiff.

    Exact (first derivatives of a linear map); inside a traced function the unused forward is pruned,
    so this is the map's transposed operation (a transposed convolution, a matrix product).
    """
    zeros = tf.zeros(tf.concat([tf.shape(cotangent)[:1], input_shape], 0), cotangent.dtype)
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        image = linear(zeros)
    return tape.gradient(image, zeros, output_gradients=cotangent)


def weight(layer: keras.layers.Layer, name: str, like: tf.Tensor, magnitude: bool = False) -> tf.Tensor:
    """The layer's weight ``name`` in the dtype of ``like`` (float64 decisions use float64 weights),
    by its absolute value when ``magnitude``."""
    value = tf.cast(getattr(layer, name), like.dtype)
    return tf.abs(value) if magnitude else value


class Stage:
    """One affine map of a layer: z = lin(u) + b, the weights it is affine in, and its adjoint in u.

    Subclasses implement ``linear`` (the map without its offset, with weights by magnitude on request) and
    ``patches``, and ``z`` where it is not that map plus the stage's bias weight.
    """

    channel_axes = 1

    def __init__(self, layer: keras.layers.Layer, name: str, weights: dict[str, TargetWeight]):
        self.layer = layer
        self.name = name
        self.weights = weights

    def z(self, u: tf.Tensor) -> tf.Tensor:
        """The stage's output from its input ``u``, computed as the layer does: its map, plus its bias where the
        stage has one as a weight (stages whose offset is no target weight override this)."""
        z = self.linear(u)
        return z + weight(self.layer, "bias", z) if "bias" in self.weights else z

    def linear(self, u: tf.Tensor, magnitude: bool = False) -> tf.Tensor:
        """The stage's map without its offset (by its weights' magnitudes when ``magnitude``)."""
        raise NotImplementedError

    def patches(self, weight_name: str, u: tf.Tensor) -> tf.Tensor:
        """(N, S, G, F) patches of ``weight_name`` for stage input ``u`` (dense, or ``OneHotPatches``)."""
        raise NotImplementedError

    def input_adjoint(self, g: tf.Tensor, input_shape, magnitude: bool = False) -> tf.Tensor:
        """Jᵀ g for cotangents (K, N, ...) at z: cotangents (K, N, ...) at the stage input."""
        return merged(g, lambda flat: linear_adjoint(lambda u: self.linear(u, magnitude), input_shape, flat))

    def flat(self, z_like: tf.Tensor) -> tf.Tensor:
        """(N, S, O) view of a tensor shaped like z."""
        return flatten_positions(z_like, self.channel_axes)


def ones_patches(z: tf.Tensor, channel_axes: int = 1) -> tf.Tensor:
    """(N, S, 1, 1) patches of a bias: z moves one for one with it."""
    flat = flatten_positions(z, channel_axes)
    return tf.ones_like(flat[:, :, :1])[:, :, :, None]


def bias_weight(layer: keras.layers.Layer, name: str = "bias", dims: tuple[str, ...] = ("out_channel",)) -> TargetWeight:
    """A bias over z's channels (flattened): one feature, the channels on the shard axis."""
    shape = shape_of(getattr(layer, name))
    return TargetWeight(name, shape, tuple(range(len(shape))), 0, 1, dims if len(dims) == len(shape) else
                        tuple(f"channel{i}" for i in range(len(shape))))


@dataclass
class LayerKind:
    """A layer as a chain of affine stages followed, when ``activated``, by its ``activation`` attribute (read at
    call time, so rules that swap it are seen)."""

    layer: keras.layers.Layer
    stages: tuple[Stage, ...]
    activated: bool = True

    @property
    def activation(self) -> Callable | None:
        return getattr(self.layer, "activation", None) if self.activated else None

    def stage_of(self, weight_name: str) -> int:
        for index, stage in enumerate(self.stages):
            if weight_name in stage.weights:
                return index
        raise KeyError(weight_name)

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(name for stage in self.stages for name in stage.weights)

    def stage_input(self, index: int, a: tf.Tensor) -> tf.Tensor:
        """Stage ``index``'s input from the layer's input ``a``."""
        for stage in self.stages[:index]:
            a = stage.z(a)
        return a

    def after(self, index: int, z: tf.Tensor) -> tf.Tensor:
        """The layer's output from stage ``index``'s output ``z``."""
        for stage in self.stages[index + 1:]:
            z = stage.z(z)
        return z if self.activation is None else self.activation(z)

    def output(self, a: tf.Tensor) -> tf.Tensor:
        """The layer's output, computed through the stages."""
        last = len(self.stages) - 1
        return self.after(last, self.stages[last].z(self.stage_input(last, a)))
