"""One record of facts per Keras layer type and per activation: everything the engines rely on.

For a layer type (looked up through the class hierarchy, never past a subclass that overrides
``call``, whose computation is then unknown):

* ``kind``: the target kind (``pipeline.curvature.kinds``) when its weights can be targets; the
  same object is its affine map when it sits after a target;
* ``piecewise_linear``: whether, in inference mode, the layer is piecewise linear in the inputs that
  depend on a target (then the factored engine is exact through it);
* ``transpose``: how columns of cotangents go back through it as one batched op (``TransposeRule``);
  affine kinds get theirs from the kind and their activation's slope;
* ``second_order``: where TensorFlow's automatic second derivatives are wrong or missing, an
  evaluation with the same values whose autodiff is exact; which layers need one, and that each
  is right, is decided by the audit (``pipeline.curvature.audit``) against float64 differences
  of function values;
* ``audit``: the configurations the audit checks.

Adding a layer type is one entry here plus its tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import keras
import tensorflow as tf
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import nn as _NN
from keras.src.ops import numpy as _N

from pipeline.curvature.kinds.base import LayerKind, linear_adjoint, merged
from pipeline.curvature.kinds.conv import conv_kind, conv_transpose_kind, depthwise_kind, separable_kind
from pipeline.curvature.kinds.dense import dense_kind, einsum_kind
from pipeline.curvature.kinds.embedding import embedding_kind
from pipeline.curvature.kinds.normalization import batch_norm_kind, layer_norm_kind

_L = keras.layers


# Activations ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationFacts:
    """``slope(x)``: d activation / dx for a piecewise-linear activation (None: not piecewise linear);
    ``second_order``: (what it does, a function with the same values whose autodiff is exact)."""

    slope: Callable[[tf.Tensor], tf.Tensor] | None = None
    second_order: tuple[str, Callable] | None = None

    @property
    def piecewise_linear(self) -> bool:
        return self.slope is not None


def _band(x, low, high, inside=1.0):
    """``inside`` where low < x < high, else 0, in x's dtype."""
    return tf.cast((x > low) & (x < high), x.dtype) * inside


def softsign(x):
    """x / (1 + |x|), as autodiff-able ops: TensorFlow's Softsign op has no second-order gradient."""
    return x / (1 + tf.abs(x))


ACTIVATIONS: dict[str, ActivationFacts] = {
    "linear": ActivationFacts(slope=tf.ones_like),
    "relu": ActivationFacts(slope=lambda x: tf.cast(x > 0, x.dtype)),
    "relu6": ActivationFacts(slope=lambda x: _band(x, 0.0, 6.0)),
    "leaky_relu": ActivationFacts(slope=lambda x: tf.where(x > 0, tf.ones_like(x), 0.2 * tf.ones_like(x))),
    "hard_sigmoid": ActivationFacts(slope=lambda x: _band(x, -3.0, 3.0, 1.0 / 6.0)),
    "hard_tanh": ActivationFacts(slope=lambda x: _band(x, -1.0, 1.0)),
    "soft_shrink": ActivationFacts(slope=lambda x: tf.cast(tf.abs(x) > 0.5, x.dtype)),
    "softsign": ActivationFacts(second_order=("x / (1 + abs(x)) as elementary ops", softsign)),
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


def activation_facts(layer) -> ActivationFacts | None:
    """Facts of ``layer``'s own Keras activation (the identity when it has none); None for a custom function."""
    name = activation_name(layer)
    if name is None:
        return ACTIVATIONS["linear"]
    if not is_keras_activation(name, layer.activation):
        return None
    return ACTIVATIONS.get(name, ActivationFacts())


def activation_slope(layer, pre: tf.Tensor) -> tf.Tensor | None:
    """The slope of ``layer``'s piecewise-linear activation at ``pre`` (None for the identity)."""
    if activation_name(layer) in (None, "linear"):
        return None
    return activation_facts(layer).slope(pre)


# Transposed Jacobians ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TransposeRule:
    """``forward(layer, x) -> (y, saved)`` evaluates the layer as the model does (inference mode) and keeps
    what its Jacobian needs; ``transpose(layer, saved, v, magnitude)`` maps output cotangents (K, N, ...)
    to input cotangents (a list, one per input, for merges), through |Jᵀ| (every weight by its absolute
    value) when ``magnitude``: applied to positive cotangents that reaches, without cancellation, every
    input that any cotangent can reach. ``exact_magnitude`` is False where the rule cannot give |Jᵀ|
    (its Jacobian's signs are unknown), so supports are not computed through it."""

    forward: Callable
    transpose: Callable
    label: str
    exact_magnitude: bool = True
    captures_stages: bool = False  # ``transpose`` takes ``sites`` and ``need_input`` (layers that hold targets)
    takes_arguments: bool = False  # ``forward(operation, args, kwargs)`` gets the node's whole call, ``transpose`` its
    # node (``keras.ops`` nodes, whose constants live in the node)


def _masked(v, mask):
    return v if mask is None else v * mask


def _plain_forward(layer, x):
    """The layer's output, keeping nothing: its transpose needs no state (identities, sums of inputs)."""
    return layer(x, training=False), None


def _identity_transpose(layer, saved, v, magnitude=False):
    return v


def _shape_forward(layer, x):
    """The layer's output, keeping its input's shape (per example) for the transpose."""
    return layer(x, training=False), tf.shape(x)[1:]


def _linear_transpose(layer, input_shape, v, magnitude=False):
    """Jᵀ v of a layer that is linear with non-negative coefficients (reshapes, pads, crops, upsampling, average
    pools): its own autodiff at any point, and |Jᵀ| = Jᵀ."""
    return merged(v, lambda g: linear_adjoint(lambda x: layer(x, training=False), input_shape, g))


def _input_forward(layer, x):
    """The layer's output, keeping its input: its Jacobian depends on where it is evaluated."""
    return layer(x, training=False), x


def _vjp_at_input(layer, x, v, magnitude=False):
    """Jᵀ v at the saved input, by autodiff of the layer on the input repeated once per column.

    For piecewise-linear layers whose Jacobian holds only 0 and 1 (max pools of any rank, maxima), so
    |Jᵀ| = Jᵀ."""
    inputs = x if isinstance(x, (list, tuple)) else [x]
    k = tf.shape(v)[0]
    tiled = [tf.reshape(tf.repeat(t[None], k, axis=0), tf.concat([[-1], tf.shape(t)[1:]], 0)) for t in inputs]
    with tf.GradientTape() as tape:
        tape.watch(tiled)
        y = layer(tiled if isinstance(x, (list, tuple)) else tiled[0], training=False)
    flat_v = tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0))
    grads = tape.gradient(y, tiled, output_gradients=flat_v)
    shaped = [tf.reshape(g, tf.concat([[k], tf.shape(t)], 0)) for g, t in zip(grads, inputs)]
    return shaped if isinstance(x, (list, tuple)) else shaped[0]


def _affine_forward(layer, x):
    """Through a layer's affine stages and activation (its target kind), keeping each stage's input (patches
    of targets and the adjoints' shapes) and the activation's slope."""
    kind = kind_of(layer)
    inputs, u = [], x
    for stage in kind.stages:
        inputs.append(u)
        u = stage.z(u)
    slope = activation_slope(layer, u)
    y = u if kind.activation is None else kind.activation(u)
    return y, (tuple(inputs), slope)


def affine_transpose(layer, saved, v, magnitude=False, sites=None, need_input=True):
    """Back through the activation's slope and each stage's adjoint; ``sites[i]`` receives the cotangent at
    stage i's output z when ``sites`` is a dict (the layer holds targets). Without ``need_input`` the first
    stage's adjoint (to the layer's input) is skipped and None returned."""
    inputs, slope = saved
    v = _masked(v, tf.abs(slope) if magnitude and slope is not None else slope)
    for index in reversed(range(len(inputs))):
        if sites is not None:
            sites[index] = v
        if index == 0 and not need_input:
            return None
        v = kind_of(layer).stages[index].input_adjoint(v, tf.shape(inputs[index])[1:], magnitude)
    return v


def _slope_forward(layer, x):
    return layer(x, training=False), activation_slope(layer, x)


def _slope_transpose(layer, slope, v, magnitude=False):
    return _masked(v, tf.abs(slope) if magnitude and slope is not None else slope)


def relu_slope(layer, x):
    """d ReLU(x) / dx for a ReLU layer with its threshold, negative slope and maximum."""
    inside = tf.ones_like(x) if layer.max_value is None else tf.cast(x < layer.max_value, x.dtype)
    return tf.where(x > layer.threshold, inside, tf.cast(layer.negative_slope, x.dtype) * tf.ones_like(x))


def _relu_forward(layer, x):
    return layer(x, training=False), relu_slope(layer, x)


def _leaky_forward(layer, x):
    return layer(x, training=False), tf.where(x > 0, tf.ones_like(x), tf.cast(layer.negative_slope, x.dtype) * tf.ones_like(x))


def _prelu_forward(layer, x):
    return layer(x, training=False), tf.where(x > 0, tf.ones_like(x), tf.cast(layer.alpha, x.dtype) * tf.ones_like(x))


def window_maxima(x: tf.Tensor, pool: tuple, strides: tuple, padding: str) -> tuple[tf.Tensor, tf.Tensor]:
    """2-D max pooling of ``x`` and each window's argmax as a flat index into ``x`` (the first one on ties)."""
    return tf.nn.max_pool_with_argmax(x, [1, *pool, 1], [1, *strides, 1], padding.upper(), include_batch_in_index=True)


def _pool_geometry(layer) -> tuple[tuple, tuple, bool]:
    """(pool, strides, one-dimensional) of a 1-D or 2-D max pool, 1-D pools as 2-D ones of height 1."""
    one_d = len(layer.pool_size) == 1
    if one_d:
        return (1, *layer.pool_size), (1, *layer.strides), True
    return tuple(layer.pool_size), tuple(layer.strides), False


def _windows_tile(layer, x) -> bool:
    """True when the pooling windows are disjoint and cover the (2-D view of the) input exactly."""
    pool, strides, one_d = _pool_geometry(layer)
    spatial = (1, x.shape[1]) if one_d else tuple(x.shape[1:3])
    return strides == pool and all(d is not None and d % p == 0 for d, p in zip(spatial, pool))


def _max_pool_forward(layer, x):
    """The pooled values, and where each window's maximum is (the first one on ties, as MaxPoolGrad routes).

    Tiling windows keep it as a 0/1 mask over the input (routing is then one broadcast product),
    others as flat argmax indices."""
    pool, strides, one_d = _pool_geometry(layer)
    x2 = x[:, None] if one_d else x
    y, argmax = window_maxima(x2, pool, strides, layer.padding)
    y = y[:, 0] if one_d else y
    if _windows_tile(layer, x):
        size = tf.cast(tf.reshape(tf.size(x2), [1]), tf.int64)
        hits = tf.scatter_nd(tf.reshape(argmax, (-1, 1)), tf.ones(tf.size(argmax), x.dtype), size)
        return y, (tf.shape(x2), tf.reshape(hits, tf.shape(x2)))
    return y, (tf.shape(x2), argmax)


def _max_pool_transpose(layer, saved, v, magnitude=False):
    """Route each cotangent to its window's maximum."""
    input_shape, where = saved
    pool, _, one_d = _pool_geometry(layer)
    v = v[:, :, None] if one_d else v
    k = tf.shape(v)[0]
    if where.dtype.is_floating:  # tiling windows: a 0/1 mask
        (ph, pw) = pool
        n, h, w, c = (tf.shape(v)[i] for i in range(1, 5))
        spread = tf.broadcast_to(v[:, :, :, None, :, None, :], tf.stack([k, n, h, ph, w, pw, c]))
        routed = tf.reshape(spread, tf.concat([[k], input_shape], 0)) * tf.cast(where, v.dtype)
    else:
        flat = tf.math.unsorted_segment_sum(tf.transpose(tf.reshape(v, (k, -1))), tf.reshape(where, [-1]),
                                            tf.reduce_prod(input_shape))
        routed = tf.reshape(tf.transpose(flat), tf.concat([[k], input_shape], 0))
    return routed[:, :, 0] if one_d else routed


def _scale_forward(layer, x):
    """BatchNormalization-free scalings: the layer's output and the factor each input is multiplied by."""
    if isinstance(layer, _L.Rescaling):
        return layer(x, training=False), tf.cast(layer.scale, x.dtype)
    variance = tf.cast(layer.variance, x.dtype)
    return layer(x, training=False), 1.0 / tf.maximum(tf.sqrt(variance), keras.config.epsilon())


def _scale_transpose(layer, scale, v, magnitude=False):
    return v * (tf.abs(scale) if magnitude else scale)


def _same_shapes(layer) -> bool:
    """True when a merge layer's inputs have equal shapes (no broadcasting)."""
    return len({tuple(t.shape) for t in layer.input}) == 1


def _add_transpose(layer, saved, v, magnitude=False):
    return [v] * len(layer.input)


def _scaled_sum_transpose(layer, saved, v, magnitude=False):
    """``inputs[0] + inputs[1] * scale`` (InceptionResNetV2's residual scaling): v to the first input, v·scale to the
    second (|scale| for magnitudes)."""
    return [v, v * (abs(layer.scale) if magnitude else layer.scale)]


def _subtract_transpose(layer, saved, v, magnitude=False):
    return [v, v if magnitude else -v]


def _average_transpose(layer, saved, v, magnitude=False):
    return [v / len(layer.input)] * len(layer.input)


def _concatenate_forward(layer, inputs):
    return layer(inputs, training=False), [tf.shape(t)[layer.axis] for t in inputs]


def _concatenate_transpose(layer, sizes, v, magnitude=False):
    """Split the cotangent along the joined axis (one further along: the leading axis holds the columns)."""
    return tf.split(v, tf.stack(sizes), axis=layer.axis if layer.axis < 0 else layer.axis + 1, num=len(sizes))


def _op_forward(operation, args, kwargs):
    """A ``keras.ops`` node's output, keeping its tensor arguments (its constants stay in its node) for the transpose."""
    return operation(*args, **kwargs), [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, tf.Tensor)]


def _op_transpose(operation, saved, v, magnitude=False, node=None):
    """Jᵀ v for each tensor argument of a ``keras.ops`` node, by autodiff of the op on its arguments repeated once per
    column (the op is piecewise linear in its dependent arguments, so this is its Jacobian at the saved point)."""
    k = tf.shape(v)[0]
    tiled = [tf.reshape(tf.repeat(t[None], k, axis=0), tf.concat([[-1], tf.shape(t)[1:]], 0)) for t in saved]
    with tf.GradientTape() as tape:
        tape.watch(tiled)
        args, kwargs = node.arguments.fill_in({id(kt): t for kt, t in zip(node.arguments.keras_tensors, tiled)})
        y = operation(*args, **kwargs)
    grads = tape.gradient(y, tiled, output_gradients=tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)),
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    shaped = [tf.reshape(g, tf.concat([[k], tf.shape(t)], 0)) for g, t in zip(grads, saved)]
    return shaped if len(shaped) > 1 else shaped[0]


IDENTITY_RULE = TransposeRule(_plain_forward, _identity_transpose, "identity")
AFFINE_RULE = TransposeRule(_affine_forward, affine_transpose, "activation slope, then its stages' transposed maps", captures_stages=True)
SLOPE_RULE = TransposeRule(_slope_forward, _slope_transpose, "activation slope")
LINEAR_RULE = TransposeRule(_shape_forward, _linear_transpose, "its transposed linear map")
VJP_RULE = TransposeRule(_input_forward, _vjp_at_input, "autodiff at its input")
SIGNED_VJP_RULE = TransposeRule(_input_forward, _vjp_at_input, "autodiff at its inputs", exact_magnitude=False)
OP_RULE = TransposeRule(_op_forward, _op_transpose, "autodiff at its arguments", takes_arguments=True)
SIGNED_OP_RULE = TransposeRule(_op_forward, _op_transpose, "autodiff at its arguments", exact_magnitude=False, takes_arguments=True)
MAX_POOL_RULE = TransposeRule(_max_pool_forward, _max_pool_transpose, "routing to each window's maximum")
RELU_RULE = TransposeRule(_relu_forward, _slope_transpose, "slope (threshold, negative slope, maximum)")
LEAKY_RULE = TransposeRule(_leaky_forward, _slope_transpose, "slope")
PRELU_RULE = TransposeRule(_prelu_forward, _slope_transpose, "slope")
SCALE_RULE = TransposeRule(_scale_forward, _scale_transpose, "its scale")
ADD_RULE = TransposeRule(_plain_forward, _add_transpose, "copies to every input")
SCALED_SUM_RULE = TransposeRule(_plain_forward, _scaled_sum_transpose, "the first input's copy, the second's scaled")
SUBTRACT_RULE = TransposeRule(_plain_forward, _subtract_transpose, "copies, negated for the second input")
AVERAGE_RULE = TransposeRule(_plain_forward, _average_transpose, "shares to every input")
CONCATENATE_RULE = TransposeRule(_concatenate_forward, _concatenate_transpose, "split along the joined axis")


# Second-order rules -----------------------------------------------------------------------------

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


def _max_pool_by_gather(layer: keras.layers.Layer) -> Callable:
    """Max pooling as a gather of the input at each window's argmax (indices held constant): the same values.

    TensorFlow's vectorized Hessian-vector products through MaxPool with overlapping, same-padded
    windows come out as zeros; gathers differentiate exactly to any order, vectorized or not.
    """
    original = type(layer).call

    def call(inputs, *args, **kwargs):
        if layer.data_format != "channels_last":
            return original(layer, inputs, *args, **kwargs)
        pool, strides, one_d = _pool_geometry(layer)
        x = inputs[:, None] if one_d else inputs
        _, argmax = window_maxima(tf.stop_gradient(x), pool, strides, layer.padding)
        pooled = tf.gather(tf.reshape(x, [-1]), argmax)
        return pooled[:, 0] if one_d else pooled

    return call


# The table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditCase:
    """One configuration of a layer type for the audit: ``make(dtype=...)`` builds it, ``shapes`` are its
    inputs' per-example shapes, ``call(layer, inputs)`` calls it."""

    label: str
    make: Callable[..., keras.layers.Layer]
    shapes: tuple[tuple[int, ...], ...]
    call: Callable = field(default=lambda layer, xs: layer(xs[0] if len(xs) == 1 else xs, training=False))


def activation_is_piecewise_linear(layer, dependent=()) -> bool:
    """True when ``layer``'s own activation (the identity when it has none) is a piecewise-linear Keras one."""
    facts = activation_facts(layer)
    return facts is not None and facts.piecewise_linear


@dataclass(frozen=True)
class LayerFacts:
    """What the engines know about one layer type (see the module docstring).

    ``piecewise_linear(layer, dependent)`` (``dependent``: which of the step's inputs depend on a target) and
    ``applies(layer)`` (None when the transpose rule covers this instance's settings, else why not) are
    functions of the instance; ``kind`` builds its target kind.
    """

    piecewise_linear: Callable[[keras.layers.Layer, tuple], bool] = lambda layer, dependent: False
    kind: Callable[[keras.layers.Layer], LayerKind] | None = None
    transpose: TransposeRule | None = None
    applies: Callable[[keras.layers.Layer], str | None] = lambda layer: None
    second_order: tuple[str, Callable[[keras.layers.Layer], Callable]] | None = None
    audit: tuple[AuditCase, ...] = ()


def _linear_in_one(operation, dependent=()) -> bool:
    """A product is linear when at most one factor depends on a target."""
    return sum(dependent) <= 1


def _always(layer, dependent=()) -> bool:
    return True


def _not_inverted(layer, dependent=()) -> bool:
    return not layer.invert


def _channels_last(layer) -> str | None:
    return None if getattr(layer, "data_format", "channels_last") == "channels_last" else f"data_format {layer.data_format}"


def _affine_applies(layer) -> str | None:
    if _channels_last(layer):
        return _channels_last(layer)
    return None if activation_is_piecewise_linear(layer) else f"activation {activation_name(layer)!r}"


def _batch_norm_applies(layer) -> str | None:
    return None if layer.axis in (-1, len(layer.input.shape) - 1) else f"axis {layer.axis}"


def _merge_applies(layer) -> str | None:
    return None if _same_shapes(layer) else "inputs of different shapes (broadcasting)"


def _concatenate_applies(layer) -> str | None:
    return None if layer.axis % len(layer.output.shape) != 0 else "joined along the batch axis"


def _case(label, make, *shapes, call=None) -> AuditCase:
    return AuditCase(label, make, shapes, call) if call else AuditCase(label, make, shapes)


def _self_attention(layer, xs):
    return layer(xs[0], xs[0], training=False)


VEC, SEQ, IMG, VOL = (6,), (4, 6), (5, 5, 4), (4, 4, 4, 2)
MOMENTS = ("moments without stop_gradient", _with_exact_moments)
GATHER = ("gather at the argmax", _max_pool_by_gather)


def _affine(kind, *cases) -> LayerFacts:
    return LayerFacts(activation_is_piecewise_linear, kind, AFFINE_RULE, _affine_applies, audit=cases)


def _linear(*cases, applies=_channels_last) -> LayerFacts:
    return LayerFacts(_always, None, LINEAR_RULE, applies, audit=cases)


def _identity(*cases) -> LayerFacts:
    return LayerFacts(_always, None, IDENTITY_RULE, audit=cases)


def _smooth(*cases, second_order=None, kind=None) -> LayerFacts:
    return LayerFacts(kind=kind, second_order=second_order, audit=cases)


FACTS: dict[type, LayerFacts] = {
    _L.InputLayer: _identity(),
    _L.Dense: _affine(dense_kind, _case("Dense", lambda **k: _L.Dense(5, **k), VEC)),
    _L.EinsumDense: _affine(einsum_kind, _case("EinsumDense", lambda **k: _L.EinsumDense("...b,bc->...c", output_shape=5,
                                                                                              bias_axes="c", **k), SEQ)),
    _L.Conv1D: _affine(conv_kind, _case("Conv1D", lambda **k: _L.Conv1D(3, 3, **k), SEQ)),
    _L.Conv2D: _affine(conv_kind, _case("Conv2D", lambda **k: _L.Conv2D(3, 3, padding="same", **k), IMG),
                       _case("Conv2D(strided, dilated)", lambda **k: _L.Conv2D(3, 2, strides=2, **k), IMG)),
    _L.Conv3D: _affine(conv_kind, _case("Conv3D", lambda **k: _L.Conv3D(2, 2, **k), VOL)),
    _L.DepthwiseConv2D: _affine(depthwise_kind, _case("DepthwiseConv2D", lambda **k: _L.DepthwiseConv2D(3, **k), IMG)),
    _L.SeparableConv2D: _affine(separable_kind, _case("SeparableConv2D", lambda **k: _L.SeparableConv2D(3, 3, **k), IMG)),
    _L.Conv2DTranspose: _affine(conv_transpose_kind, _case("Conv2DTranspose", lambda **k: _L.Conv2DTranspose(3, 3, **k), IMG)),
    _L.Conv1DTranspose: _affine(conv_transpose_kind, _case("Conv1DTranspose", lambda **k: _L.Conv1DTranspose(3, 3, **k), SEQ)),
    _L.DepthwiseConv1D: _affine(depthwise_kind, _case("DepthwiseConv1D", lambda **k: _L.DepthwiseConv1D(3, **k), SEQ)),
    _L.SeparableConv1D: _affine(separable_kind, _case("SeparableConv1D", lambda **k: _L.SeparableConv1D(3, 3, **k), SEQ)),
    _L.Conv3DTranspose: _affine(conv_transpose_kind),
    _L.MaxPooling1D: LayerFacts(_always, None, MAX_POOL_RULE, _channels_last, GATHER, (
        _case("MaxPooling1D", lambda **k: _L.MaxPooling1D(**k), SEQ),
        _case("MaxPooling1D(2, strides 1, same)", lambda **k: _L.MaxPooling1D(2, strides=1, padding="same", **k), (6, 3)))),
    _L.MaxPooling2D: LayerFacts(_always, None, MAX_POOL_RULE, _channels_last, GATHER, (
        _case("MaxPooling2D", lambda **k: _L.MaxPooling2D(**k), IMG),
        _case("MaxPooling2D(2, strides 1, same)", lambda **k: _L.MaxPooling2D(2, strides=1, padding="same", **k), (6, 6, 3)),
        _case("MaxPooling2D(3, strides 2)", lambda **k: _L.MaxPooling2D(3, strides=2, **k), IMG))),
    _L.MaxPooling3D: LayerFacts(_always, None, VJP_RULE, _channels_last, audit=(
        _case("MaxPooling3D", lambda **k: _L.MaxPooling3D(**k), VOL),)),
    _L.AveragePooling1D: _linear(_case("AveragePooling1D", lambda **k: _L.AveragePooling1D(2, **k), SEQ)),
    _L.AveragePooling2D: _linear(_case("AveragePooling2D", lambda **k: _L.AveragePooling2D(2, **k), IMG),
                                 _case("AveragePooling2D(3, strides 1, same)",
                                       lambda **k: _L.AveragePooling2D(3, strides=1, padding="same", **k), IMG)),
    _L.AveragePooling3D: _linear(_case("AveragePooling3D", lambda **k: _L.AveragePooling3D(2, **k), VOL)),
    _L.GlobalMaxPooling1D: LayerFacts(_always, None, VJP_RULE, _channels_last, audit=(
        _case("GlobalMaxPooling1D", lambda **k: _L.GlobalMaxPooling1D(**k), SEQ),)),
    _L.GlobalMaxPooling2D: LayerFacts(_always, None, VJP_RULE, _channels_last, audit=(
        _case("GlobalMaxPooling2D", lambda **k: _L.GlobalMaxPooling2D(**k), IMG),)),
    _L.GlobalMaxPooling3D: LayerFacts(_always, None, VJP_RULE, _channels_last, audit=(
        _case("GlobalMaxPooling3D", lambda **k: _L.GlobalMaxPooling3D(**k), VOL),)),
    _L.GlobalAveragePooling1D: _linear(_case("GlobalAveragePooling1D", lambda **k: _L.GlobalAveragePooling1D(**k), SEQ),
                                       applies=_channels_last),
    _L.GlobalAveragePooling2D: _linear(_case("GlobalAveragePooling2D", lambda **k: _L.GlobalAveragePooling2D(**k), IMG),
                                       applies=_channels_last),
    _L.GlobalAveragePooling3D: _linear(_case("GlobalAveragePooling3D", lambda **k: _L.GlobalAveragePooling3D(**k), VOL),
                                       applies=_channels_last),
    _L.Flatten: _linear(_case("Flatten", lambda **k: _L.Flatten(**k), IMG)),
    _L.Reshape: _linear(_case("Reshape", lambda **k: _L.Reshape((25, 4), **k), IMG)),
    _L.Permute: _linear(_case("Permute", lambda **k: _L.Permute((2, 1), **k), SEQ)),
    _L.RepeatVector: _linear(_case("RepeatVector", lambda **k: _L.RepeatVector(3, **k), VEC)),
    _L.ZeroPadding1D: _linear(_case("ZeroPadding1D", lambda **k: _L.ZeroPadding1D(1, **k), SEQ)),
    _L.ZeroPadding2D: _linear(_case("ZeroPadding2D", lambda **k: _L.ZeroPadding2D(1, **k), IMG)),
    _L.ZeroPadding3D: _linear(_case("ZeroPadding3D", lambda **k: _L.ZeroPadding3D(1, **k), VOL)),
    _L.Cropping1D: _linear(_case("Cropping1D", lambda **k: _L.Cropping1D(1, **k), SEQ)),
    _L.Cropping2D: _linear(_case("Cropping2D", lambda **k: _L.Cropping2D(1, **k), IMG)),
    _L.Cropping3D: _linear(_case("Cropping3D", lambda **k: _L.Cropping3D(1, **k), VOL)),
    _L.UpSampling1D: _linear(_case("UpSampling1D", lambda **k: _L.UpSampling1D(2, **k), SEQ)),
    _L.UpSampling2D: _linear(_case("UpSampling2D", lambda **k: _L.UpSampling2D(2, **k), IMG)),
    _L.UpSampling3D: _linear(_case("UpSampling3D", lambda **k: _L.UpSampling3D(2, **k), VOL)),
    _L.Add: LayerFacts(_always, None, ADD_RULE, _merge_applies, audit=(
        _case("Add", lambda **k: _L.Add(**k), VEC, VEC),)),
    CustomScaleLayer: LayerFacts(_always, None, SCALED_SUM_RULE, _merge_applies, audit=(
        _case("CustomScaleLayer", lambda **k: CustomScaleLayer(0.17, **k), VEC, VEC),)),
    _L.Subtract: LayerFacts(_always, None, SUBTRACT_RULE, _merge_applies, audit=(
        _case("Subtract", lambda **k: _L.Subtract(**k), VEC, VEC),)),
    _L.Multiply: LayerFacts(_linear_in_one, None, SIGNED_VJP_RULE, _merge_applies, audit=(
        _case("Multiply", lambda **k: _L.Multiply(**k), VEC, VEC),)),
    _L.Average: LayerFacts(_always, None, AVERAGE_RULE, _merge_applies, audit=(
        _case("Average", lambda **k: _L.Average(**k), VEC, VEC),)),
    _L.Maximum: LayerFacts(_always, None, VJP_RULE, _merge_applies, audit=(_case("Maximum", lambda **k: _L.Maximum(**k), VEC, VEC),)),
    _L.Minimum: LayerFacts(_always, None, VJP_RULE, _merge_applies, audit=(_case("Minimum", lambda **k: _L.Minimum(**k), VEC, VEC),)),
    _L.Concatenate: LayerFacts(_always, None, CONCATENATE_RULE, _concatenate_applies,
                               audit=(_case("Concatenate", lambda **k: _L.Concatenate(**k), VEC, VEC),)),
    _L.Dot: _smooth(_case("Dot", lambda **k: _L.Dot(axes=1, **k), VEC, VEC),
                    _case("Dot(normalize)", lambda **k: _L.Dot(axes=1, normalize=True, **k), VEC, VEC)),
    _L.BatchNormalization: LayerFacts(_always, batch_norm_kind, AFFINE_RULE, _batch_norm_applies, audit=(
        _case("BatchNormalization", lambda **k: _L.BatchNormalization(**k), IMG),)),
    _L.LayerNormalization: _smooth(
        _case("LayerNormalization", lambda **k: _L.LayerNormalization(**k), VEC),
        _case("LayerNormalization(axis=(1, 2))", lambda **k: _L.LayerNormalization(axis=(1, 2), **k), SEQ),
        _case("LayerNormalization(no center, no scale)", lambda **k: _L.LayerNormalization(center=False, scale=False, **k), SEQ),
        _case("LayerNormalization(rms_scaling)", lambda **k: _L.LayerNormalization(rms_scaling=True, **k), VEC),
        second_order=MOMENTS, kind=layer_norm_kind),
    _L.GroupNormalization: _smooth(
        _case("GroupNormalization", lambda **k: _L.GroupNormalization(groups=2, **k), IMG),
        _case("GroupNormalization(groups=-1)", lambda **k: _L.GroupNormalization(groups=-1, **k), SEQ),
        second_order=MOMENTS),
    _L.RMSNormalization: _smooth(_case("RMSNormalization", lambda **k: _L.RMSNormalization(**k), SEQ)),
    _L.UnitNormalization: _smooth(_case("UnitNormalization", lambda **k: _L.UnitNormalization(**k), SEQ)),
    **{kind: _identity(_case(kind.__name__, lambda kind=kind, **k: kind(0.5, **k), shape))
       for kind, shape in ((_L.Dropout, VEC), (_L.SpatialDropout1D, SEQ), (_L.SpatialDropout2D, IMG), (_L.SpatialDropout3D, VOL),
                           (_L.GaussianDropout, VEC), (_L.GaussianNoise, VEC), (_L.AlphaDropout, VEC))},
    _L.ActivityRegularization: _identity(_case("ActivityRegularization", lambda **k: _L.ActivityRegularization(l2=0.1, **k), VEC)),
    _L.Identity: _identity(_case("Identity", lambda **k: _L.Identity(**k), VEC)),
    _L.ReLU: LayerFacts(_always, None, RELU_RULE, audit=(_case("ReLU", lambda **k: _L.ReLU(**k), VEC),)),
    _L.LeakyReLU: LayerFacts(_always, None, LEAKY_RULE, audit=(
        _case("LeakyReLU", lambda **k: _L.LeakyReLU(**k), VEC),)),
    _L.PReLU: LayerFacts(_always, None, PRELU_RULE, audit=(
        _case("PReLU", lambda **k: _L.PReLU(**k), VEC),)),
    _L.ELU: _smooth(_case("ELU", lambda **k: _L.ELU(**k), VEC)),
    _L.Softmax: _smooth(_case("Softmax", lambda **k: _L.Softmax(**k), VEC)),
    _L.Activation: LayerFacts(activation_is_piecewise_linear, None, SLOPE_RULE,
                              lambda layer: None if activation_is_piecewise_linear(layer) else f"activation {activation_name(layer)!r}"),
    _L.Rescaling: LayerFacts(_always, None, SCALE_RULE),
    _L.Normalization: LayerFacts(_not_inverted, None, SCALE_RULE),
    _L.Embedding: LayerFacts(kind=embedding_kind),
    _L.MultiHeadAttention: _smooth(_case("MultiHeadAttention", lambda **k: _L.MultiHeadAttention(num_heads=2, key_dim=3, **k), SEQ,
                                         call=_self_attention)),
    _L.GroupQueryAttention: _smooth(_case("GroupQueryAttention", lambda **k: _L.GroupQueryAttention(
        head_dim=3, num_query_heads=2, num_key_value_heads=1, **k), SEQ, call=_self_attention)),
    _L.Attention: _smooth(_case("Attention", lambda **k: _L.Attention(**k), SEQ, SEQ)),
    _L.AdditiveAttention: _smooth(_case("AdditiveAttention", lambda **k: _L.AdditiveAttention(**k), SEQ, SEQ)),
    _L.SimpleRNN: _smooth(_case("SimpleRNN", lambda **k: _L.SimpleRNN(3, **k), SEQ)),
    _L.GRU: _smooth(_case("GRU", lambda **k: _L.GRU(3, **k), SEQ)),
    _L.LSTM: _smooth(_case("LSTM", lambda **k: _L.LSTM(3, **k), SEQ)),
}


def _linear_in_numerator(operation, dependent=()) -> bool:
    return not (len(dependent) > 1 and dependent[1])


def _op(piecewise_linear=_always, rule=OP_RULE) -> LayerFacts:
    return LayerFacts(piecewise_linear, None, rule)


# ``keras.ops`` calls in functional graphs (``x + 3``, ``keras.ops.relu6(x)``): no weights; the exact engine audits each
# on the spot on a small input (they compute in float64 as given), the factored engine walks those listed here.
FACTS.update({
    **{kind: _op() for kind in (_N.Add, _N.Reshape, _N.Transpose, _N.GetItem, _N.Concatenate, _N.Mean, _N.Sum,
                                 _N.ExpandDims, _N.Squeeze, _N.Maximum, _N.Minimum, _N.Clip, _NN.Relu, _NN.Relu6,
                                 _NN.HardSigmoid, _NN.HardTanh, _NN.LeakyRelu)},
    _N.Subtract: _op(rule=SIGNED_OP_RULE),
    _N.Negative: _op(rule=SIGNED_OP_RULE),
    _N.Multiply: _op(_linear_in_one, SIGNED_OP_RULE),
    _N.TrueDivide: _op(_linear_in_numerator, SIGNED_OP_RULE),
})


def registered_type(layer) -> type | None:
    """The class whose facts describe ``layer``: its own, or the nearest ancestor in the table, unless a class
    in between overrides ``call`` (then what it computes is unknown)."""
    for cls in type(layer).__mro__:
        if cls in FACTS:
            return cls
        if "call" in vars(cls):
            return None
    return None


def facts_of(layer) -> LayerFacts | None:
    """The facts of ``layer``'s type, or None for a type the table does not describe."""
    cls = registered_type(layer)
    return None if cls is None else FACTS[cls]


_KINDS: dict[int, tuple[keras.layers.Layer, LayerKind]] = {}


def kind_of(layer) -> LayerKind | None:
    """The target kind of ``layer`` (built once per layer), or None when its weights cannot be targets."""
    found = _KINDS.get(id(layer))
    if found is not None and found[0] is layer:
        return found[1]
    facts = facts_of(layer)
    if facts is None or facts.kind is None:
        return None
    kind = facts.kind(layer)
    _KINDS[id(layer)] = (layer, kind)
    return kind


def transpose_rule(layer) -> TransposeRule | None:
    """The rule that back-propagates column batches through ``layer``, if its type and settings have one."""
    facts = facts_of(layer)
    if facts is None or facts.transpose is None or facts.applies(layer) is not None:
        return None
    return facts.transpose


def second_order_rule(layer) -> tuple[str, Callable] | None:
    facts = facts_of(layer)
    return None if facts is None else facts.second_order


def _activation_rule(layer) -> tuple[str, Callable] | None:
    facts = activation_facts(layer)
    return None if facts is None else facts.second_order


def rule_for(layer: keras.layers.Layer) -> str | None:
    """What rule (if any) changes how ``layer`` is evaluated for second derivatives."""
    parts = []
    layer_rule = second_order_rule(layer)
    if layer_rule:
        parts.append(layer_rule[0])
    activation_rule = _activation_rule(layer)
    if activation_rule:
        parts.append(f"activation {activation_name(layer)}: {activation_rule[0]}")
    return "; ".join(parts) or None


@contextlib.contextmanager
def second_order_rules(layers: Sequence[keras.layers.Layer]) -> Iterator[None]:
    """Within the block ``layers`` evaluate through formulations whose autodiff is exact to second order.

    Values are unchanged; only how TensorFlow differentiates them changes. A layer whose ``call`` is replaced
    already (the target's, which computes its stage from a fixed input) keeps that replacement.
    """
    patched_calls, patched_activations = [], []
    try:
        for layer in layers:
            layer_rule = second_order_rule(layer)
            if layer_rule and "call" not in vars(layer):  # a target's call, replaced already, computes its own stage
                layer.call = layer_rule[1](layer)
                patched_calls.append(layer)
            activation_rule = _activation_rule(layer)
            if activation_rule:
                patched_activations.append((layer, layer.activation))
                layer.activation = activation_rule[1]
        yield
    finally:
        for layer in patched_calls:
            del layer.call
        for layer, activation in patched_activations:
            layer.activation = activation



KIND_WEIGHTS = {conv_kind: "kernel, bias", depthwise_kind: "kernel (input channels x multiplier), bias",
                separable_kind: "depthwise_kernel, pointwise_kernel, bias", conv_transpose_kind: "kernel, bias",
                dense_kind: "kernel, bias (inputs of any rank)", einsum_kind: "kernel, bias", batch_norm_kind: "gamma, beta",
                layer_norm_kind: "gamma, beta", embedding_kind: "embeddings"}
LINEARITY = {_always: "yes", activation_is_piecewise_linear: "with a piecewise-linear activation",
             _linear_in_one: "when at most one input depends on a target", _not_inverted: "unless inverted",
             _linear_in_numerator: "when the divisor does not depend on a target"}


def _name(cls: type) -> str:
    if cls.__module__.startswith("keras.src.ops"):
        return f"`keras.ops` {cls.__name__}"
    return f"`{cls.__name__}`"


def support_markdown() -> str:
    """The README's table of what the engines do with each layer type, rendered from ``FACTS``."""
    lines = [
        "Rendered from `pipeline/curvature/layer_facts.py` by `scripts/gen_audit_table.py`. \"target weights\": the weights"
        " a target kind covers; \"factored\": whether the factored engine is exact through the layer after a target;"
        " \"columns back\": how it back-propagates a chunk of factor columns through it as one batched op; a layer"
        " type not listed is audited on the spot for the exact engine and makes a suffix not piecewise linear."
        " Piecewise-linear activations: " + ", ".join(f"`{name}`" for name, facts in ACTIVATIONS.items() if facts.piecewise_linear) + ".",
        "",
        "| layer type | target weights | factored | columns back | second-order rule |",
        "|---|---|---|---|---|",
    ]
    for cls, facts in FACTS.items():
        if cls is _L.InputLayer:
            continue
        lines.append(f"| {_name(cls)} | {KIND_WEIGHTS.get(facts.kind, '—')} | {LINEARITY.get(facts.piecewise_linear, 'no')}"
                     f" | {facts.transpose.label if facts.transpose and LINEARITY.get(facts.piecewise_linear) else '—'}"
                     f" | {facts.second_order[0] if facts.second_order else '—'} |")
    return "\n".join(lines) + "\n"
