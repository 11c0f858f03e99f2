"""Models in float64: for references, and for the decisions (ReLU masks, max-pool routing, the softmax) the
factored engine takes from a forward pass accurate enough not to flip them near ties."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def float64_clone(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose layers (nested models' included) compute in float64, with the same weights."""

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer):  # ``keras.ops`` nodes have no dtype: they compute in their inputs'
            config["dtype"] = "float64"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return clone


def as_float32(structure):
    """``structure`` with every float64 tensor cast to float32 (others unchanged)."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if isinstance(t, tf.Tensor) and t.dtype == tf.float64 else t, structure)
