"""A loss of a model as a function of the target layer's pre-activation z.

Every engine works in z-space: the loss gradient w.r.t. W is a contraction of
the target's patches with dL/dz, and its Hessian is J_zᵀ H_z J_z because z
is affine in W.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import keras
import tensorflow as tf

from pipeline.curvature.graph import output_operation
from pipeline.curvature.layer_facts import second_order_rules
from pipeline.curvature.patches import channel_patches, contract
from pipeline.curvature.target import Target
from pipeline.losses import Loss


KERAS_SOFTMAXES = (keras.activations.softmax, keras.ops.softmax)


def final_softmax(model: keras.Model) -> keras.layers.Layer | None:
    """The output layer if it ends in a Keras softmax, else None.

    Only Keras' own softmax (a Softmax layer, or ``KERAS_SOFTMAXES`` as an activation) attaches its
    logits to its output, so only for it does Keras' cross-entropy use the logits, and only then is
    the loss, peeled, softmax cross-entropy of the logits (``pipeline.losses``). Another function,
    even one called "softmax", and a Softmax layer over several axes get the clipped loss of their
    values, as in Keras.
    """
    layer = output_operation(model)
    if isinstance(layer, keras.layers.Softmax):
        axes = layer.axis if isinstance(layer.axis, (tuple, list)) else (layer.axis,)
        return layer if len(axes) == 1 else None  # over several axes it is not Keras' softmax op
    activation = getattr(layer, "activation", None)
    if any(activation is softmax for softmax in KERAS_SOFTMAXES):
        return layer
    return None


@contextlib.contextmanager
def logits_output(model: keras.Model) -> keras.layers.Layer:
    """Within the block the model returns the logits its final softmax would normalize."""
    layer = final_softmax(model)
    if layer is None:
        raise ValueError(f"model {model.name!r} does not end in a softmax")
    if isinstance(layer, keras.layers.Softmax):
        layer.call = lambda inputs, *args, **kwargs: inputs
        try:
            yield layer
        finally:
            del layer.call
        return
    saved = layer.activation
    layer.activation = keras.activations.linear
    try:
        yield layer
    finally:
        layer.activation = saved


@dataclass(frozen=True)
class Problem:
    """Mean per-example ``loss`` of ``target.model`` seen as a function of the target stage's z."""

    target: Target
    loss: Loss
    rule_layers: tuple = ()

    def outputs(self, x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
        """Model output with the target stage's z replaced by z + delta.

        ``rule_layers`` evaluate through their second-order rules: the same values,
        autodiff that is exact to second order.
        """
        with self.target.perturbed(lambda z: delta), second_order_rules(self.rule_layers):
            return self.target.model(x, training=False)

    def loss_sum(self, x: tf.Tensor, y: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(self.loss.per_example(self.outputs(x, delta), y))

    def batch_gradient(self, x, y, z_channels: slice) -> tuple[tf.Tensor, tf.Tensor]:
        """(sum over the batch of dl/dW for the z channels ``z_channels`` as (F, O'), sum of losses)."""
        target = self.target
        u = target.input_stage(x)
        delta = tf.zeros_like(target.pre_activation(u))
        with tf.GradientTape() as tape:
            tape.watch(delta)
            total = self.loss_sum(x, y, delta)
        dz = target.flat(tape.gradient(total, delta))[:, :, z_channels]
        patches = channel_patches(target.patches(u), target.group_ids(z_channels))
        return contract(patches, dz), total
