"""Models in float64: for references, and for the decisions (ReLU masks, max-pool routing, the softmax) the
factored engine takes from a forward pass accurate enough not to flip them near ties."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import keras
import numpy as np
import tensorflow as tf


def _entry_dtypes(layers: list) -> list[tuple[object, str, object]]:
    """What makes the models among ``layers`` (a model's ``_all_layers``) cast what they are called on: a functional model converts
    its inputs to its symbolic inputs' dtype, a ``Sequential`` to its input layer's. As (object, attribute, value
    in float64) triples; both are float32 as built, and would round a float64 pass at each nested model's entry
    (ConvNeXt's stem and downsampling blocks), which leaves loss values in float32's precision."""
    found = []
    for layer in layers:
        first = getattr(layer, "_layers", None) if isinstance(layer, keras.Sequential) else None
        if first and isinstance(first[0], keras.layers.InputLayer):
            found.append((first[0], "_dtype", "float64"))
        if isinstance(layer, keras.Model):
            for tensor in getattr(layer, "inputs", None) or []:
                if tensor.dtype == "float32":
                    found.append((tensor, "_dtype", "float64"))
    return found


@contextlib.contextmanager
def _swapped(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    saved = [getattr(target, name) for target, name, _ in changes]
    try:
        for target, name, value in changes:
            setattr(target, name, value)
        yield
    finally:
        for (target, name, _), value in zip(changes, saved):
            setattr(target, name, value)


def _built_constants(layer) -> dict[str, tf.Tensor]:
    """The float32 tensors ``layer`` made at build time that are not variables (``Normalization``'s mean and
    variance): part of the function the model computes, as its variables are."""
    return {key: value for key, value in vars(layer).items()
            if isinstance(value, tf.Tensor) and not isinstance(value, tf.Variable) and value.dtype == tf.float32}


def float64_clone(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose layers (nested models' included) compute in float64, with the same weights.

    Constants its layers built from their config (``Normalization(mean=[0.485, ...])``) are the model's own float32
    values cast up, as in ``computing_in_float64``: rebuilt from the config in float64 they would differ in the
    eighth digit, and a sensitive network (a random EfficientNetV2's gradients move 1e-3 for that) would then be
    another function than the one the engines differentiate.
    """

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer):  # ``keras.ops`` nodes have no dtype: they compute in their inputs'
            config["dtype"] = "float64"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    copies = _all_layers(clone)
    for original, copied in zip(_all_layers(model), copies, strict=True):
        for key, value in _built_constants(original).items():
            setattr(copied, key, tf.cast(value, tf.float64))
    for target, name, value in _entry_dtypes(copies):
        setattr(target, name, value)
    return clone


def _all_layers(model: keras.Model) -> list:
    return list(model._flatten_layers(include_self=True, recursive=True))


def _float64_policy(policy):
    """``policy`` computing in float64 while its variables stay as they are (float32): a "mixed" policy, whose
    layers read their variables cast up inside an autocast scope, exactly."""
    mixed = copy.copy(policy)
    mixed._compute_dtype = "float64"
    return mixed


@contextlib.contextmanager
def computing_in_float64(model: keras.Model) -> Iterator[None]:
    """Within the block every layer of ``model`` (nested models' and sublayers included) computes in float64 from its
    float32 variables, cast up exactly: a float64 forward pass without a float64 copy of the weights. The layers'
    built constants are cast up too, so that no operation on them (``Normalization``'s square root of its variance)
    runs in float32, and nested models take float64 inputs as they are."""
    layers, changes = _all_layers(model), []
    for layer in layers:
        if getattr(layer, "_dtype_policy", None) is not None and layer.compute_dtype == "float32":
            changes.append((layer, "_dtype_policy", _float64_policy(layer._dtype_policy)))
            changes.extend((layer, key, tf.cast(value, tf.float64)) for key, value in _built_constants(layer).items())
    changes.extend(_entry_dtypes(layers))
    with _swapped(changes):
        yield


def as_float32(structure):
    """``structure`` with every float64 tensor cast to float32 (others unchanged)."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if isinstance(t, tf.Tensor) and t.dtype == tf.float64 else t, structure)
