"""Targets: which weight tensors of a model are differentiated, found by path, pattern or ``all``.

A target is one weight of one layer (possibly inside a nested model, or a sublayer such as
MultiHeadAttention's ``query``), seen through its layer's kind (``kinds``): the affine stage it
enters, its patches, its layout. Engines work in z-space: ``perturbed`` makes the layer return
what it would if its stage's output were z + delta.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import keras
import tensorflow as tf

from pipeline.curvature.kinds import LayerKind, Stage, TargetWeight
from pipeline.curvature.layer_facts import kind_of
from pipeline.errors import BadInputError


class _PrefixDone(Exception):
    """Raised inside the patched layer to stop the forward pass once its input is known."""


@dataclass(frozen=True)
class Target:
    """One weight of one layer of ``model``: the layer at ``path``, its kind, the stage the weight enters."""

    model: keras.Model
    path: str
    layer: keras.layers.Layer
    kind: LayerKind
    stage_index: int
    weight: TargetWeight

    @property
    def name(self) -> str:
        """``layer path/weight``, as the store and results name it."""
        return f"{self.path}/{self.weight.name}"

    @property
    def stage(self) -> Stage:
        return self.kind.stages[self.stage_index]

    @property
    def variable(self) -> keras.Variable:
        return getattr(self.layer, self.weight.name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def channels(self) -> int:
        """Length of the weight's shard axis (the channels work units split)."""
        return self.weight.channels

    @property
    def z_channels(self) -> int:
        return self.weight.channels * self.weight.z_channels_per_channel

    @property
    def features(self) -> int:
        return self.weight.feature_count

    def patch_floats(self, z_channels: int) -> int:
        """Numbers one example's patches hold for ``z_channels`` z channels (one code per position when one-hot)."""
        if self.weight.one_hot:
            return self.positions
        return self.positions * self.features * (1 if self.weight.groups == 1 else z_channels)

    @property
    def product_features(self) -> int:
        """Rows per example and channel of the per-column weight gradients the factored products hold: F, or at
        most one per position when the patches are one-hot."""
        return self.positions if self.weight.one_hot else self.features

    @functools.cached_property
    def z_shape(self) -> tuple[int, ...]:
        """Per-example shape of the target stage's z (from one forward pass of the prefix on zeros)."""
        spec = self.model.inputs[0]
        zeros = tf.zeros((1, *spec.shape[1:]), spec.dtype)
        return tuple(int(d) for d in self.pre_activation(self.input_stage(zeros)).shape[1:])

    @property
    def positions(self) -> int:
        """S: the entries of z per channel and example."""
        return math.prod(self.z_shape[: len(self.z_shape) - self.stage.channel_axes])

    def group_ids(self, z_channels: slice) -> tf.Tensor:
        """The patch group of each z channel in ``z_channels`` (bounds may be tensors)."""
        return tf.range(z_channels.start, z_channels.stop) // (self.z_channels // self.weight.groups)

    def stage_input(self, a: tf.Tensor) -> tf.Tensor:
        return self.kind.stage_input(self.stage_index, a)

    def pre_activation(self, u: tf.Tensor) -> tf.Tensor:
        """z of the target's stage from the stage input ``u``."""
        return self.stage.z(u)

    def patches(self, u: tf.Tensor) -> tf.Tensor:
        """(N, S, G, F) patches of the target weight for stage input ``u``."""
        return self.stage.patches(self.weight.name, u)

    def flat(self, z_like: tf.Tensor) -> tf.Tensor:
        """(N, S, O) view of a tensor shaped like z."""
        return self.stage.flat(z_like)

    def flat_columns(self, columns: tf.Tensor) -> tf.Tensor:
        """(K, N, S, O) view of columns (K, N, ...) shaped like z."""
        return tf.reshape(columns, (tf.shape(columns)[0], tf.shape(columns)[1], -1, self.z_channels))

    @contextlib.contextmanager
    def perturbed(self, delta_fn) -> Iterator[None]:
        """Within the block the layer returns what it would if its stage's z were ``z + delta_fn(z)``."""
        layer, kind, index = self.layer, self.kind, self.stage_index

        def call(inputs, *args, **kwargs):
            z = kind.stages[index].z(kind.stage_input(index, inputs))
            return kind.after(index, z + delta_fn(z))

        layer.call = call
        try:
            yield
        finally:
            del layer.call

    def layer_input(self, x: tf.Tensor) -> tf.Tensor:
        """The layer's input for model input ``x``; runs only the prefix."""
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
        raise RuntimeError(f"layer {self.path!r} was not called by the model's forward pass")

    def input_stage(self, x: tf.Tensor) -> tf.Tensor:
        """The target stage's input for model input ``x``."""
        return self.stage_input(self.layer_input(x))


def layer_paths(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """(path, layer) of every layer in model order, nested models and sublayers (``mha/query``) included."""
    found: list[tuple[str, keras.layers.Layer]] = []

    def visit(layer, prefix):
        children = layer.layers if isinstance(layer, keras.Model) else layer._flatten_layers(include_self=False, recursive=False)
        for child in children:
            if isinstance(child, keras.layers.InputLayer):
                continue
            path = f"{prefix}{child.name}"
            found.append((path, child))
            visit(child, f"{path}/")

    visit(model, "")
    return found


def layer_names(model: keras.Model) -> list[str]:
    return [path for path, _ in layer_paths(model)]


def _close_to(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _targetable_weights(layer) -> list[str]:
    kind = kind_of(layer)
    return list(kind.weight_names) if kind is not None else []


def make_target(model: keras.Model, path: str, layer: keras.layers.Layer, weight: str) -> Target:
    """The target for ``weight`` of ``layer``; raises BadInputError saying what the layer offers."""
    kind = kind_of(layer)
    if kind is None:
        raise BadInputError(
            f"layer {path!r} is a {type(layer).__name__}, which cannot be a target; target kinds are the"
            " convolutions (1-D to 3-D, grouped, depthwise, separable, transposed), Dense, EinsumDense,"
            " Embedding, BatchNormalization and LayerNormalization")
    if weight not in kind.weight_names:
        present = [w.path.split("/")[-1] for w in layer.weights]
        raise BadInputError(f"layer {path!r} ({type(layer).__name__}) has no target weight {weight!r}; its target"
                            f" weights are {list(kind.weight_names)} (all its weights: {present})")
    index = kind.stage_of(weight)
    return Target(model, path, layer, kind, index, kind.stages[index].weights[weight])


def forward_calls(model: keras.Model, layers: Sequence[keras.layers.Layer]) -> list[int]:
    """How many times one forward pass of ``model`` (on zeros) calls each of ``layers``.

    Counted, not read from the layers' graph nodes: a model loaded from a ``.keras`` file builds its
    nested ``Sequential`` models twice, which leaves their layers two nodes for one call.
    """
    counts = [0] * len(layers)
    for index, layer in enumerate(layers):
        def counted(*args, _index=index, _call=layer.call, **kwargs):
            counts[_index] += 1
            return _call(*args, **kwargs)

        layer.call = counted
    try:
        zeros = [tf.zeros((1, *spec.shape[1:]), spec.dtype) for spec in model.inputs]
        model(zeros if len(zeros) > 1 else zeros[0], training=False)
    finally:
        for layer in layers:
            del layer.call
    return counts


def refuse_shared(model: keras.Model, targets: Sequence[Target]) -> None:
    """Raise BadInputError for a target whose layer the forward pass calls more than once (its weight would enter
    the loss at several places)."""
    layers = list({id(t.layer): t for t in targets}.values())
    for target, calls in zip(layers, forward_calls(model, [t.layer for t in layers])):
        if calls > 1:
            raise BadInputError(f"layer {target.path!r} is called {calls} times in the model; a target must be called"
                                " once (its weight would enter the loss at several places)")


def _layer_at(paths: dict, layer_path: str) -> keras.layers.Layer:
    if layer_path not in paths:
        raise BadInputError(f"layer {layer_path!r} not found{_close_to(layer_path, list(paths))}; layers are: "
                            f"{', '.join(paths)}")
    return paths[layer_path]


def resolve_target(model: keras.Model, layer_path: str, weight: str = "kernel") -> Target:
    """The target at ``layer_path`` (a layer name, or a nested path such as ``stem/stem_conv``)."""
    target = located_target(model, layer_path, weight)
    refuse_shared(model, [target])
    return target


def located_target(model: keras.Model, layer_path: str, weight: str = "kernel") -> Target:
    """The target at ``layer_path`` without the forward pass that counts its layer's calls: for a copy of a model whose
    targets were resolved already (the references' float64 clone, once per tensor)."""
    return make_target(model, layer_path, _layer_at(dict(layer_paths(model)), layer_path), weight)


def resolve_targets(model: keras.Model, specs: Sequence[tuple[str, str]] | str) -> list[Target]:
    """Targets for ``all`` or for (layer pattern, weight) pairs, in model order, each once.

    A pattern is a layer path or a glob over layer paths (``block5_*``). A glob keeps the matched layers
    that have the weight; a pattern that matches none of them, or a named layer without the weight,
    raises BadInputError naming what exists.
    """
    paths = layer_paths(model)
    targetable = [(path, layer) for path, layer in paths if _targetable_weights(layer)]
    if specs == "all":
        if not targetable:
            raise BadInputError(f"model {model.name!r} has no layer whose weights can be targets")
        found = [make_target(model, path, layer, w) for path, layer in targetable for w in _targetable_weights(layer)]
        refuse_shared(model, found)
        return found
    chosen: dict[str, Target] = {}
    for pattern, weight in specs:
        if not any(ch in pattern for ch in "*?["):
            target = make_target(model, pattern, _layer_at(dict(paths), pattern), weight)
            chosen.setdefault(target.name, target)
            continue
        matched = [(path, layer) for path, layer in paths if fnmatch.fnmatchcase(path, pattern)]
        with_weight = [(path, layer) for path, layer in matched if weight in _targetable_weights(layer)]
        if not with_weight:
            offered = sorted({w for _, layer in matched for w in _targetable_weights(layer)})
            raise BadInputError(
                f"target pattern {pattern!r} with weight {weight!r} matches no target"
                + (f": the layers it matches offer {offered}" if offered else
                   f"; targetable layers are: {', '.join(p for p, _ in targetable)}"))
        for path, layer in with_weight:
            target = make_target(model, path, layer, weight)
            chosen.setdefault(target.name, target)
    order = {path: i for i, (path, _) in enumerate(paths)}
    found = sorted(chosen.values(), key=lambda t: (order[t.path], _targetable_weights(t.layer).index(t.weight.name)))
    refuse_shared(model, found)
    return found


def channel_slice(target: Target, channels: slice | None) -> slice:
    """Normalize and check a slice of ``target``'s shard-axis channels."""
    total = target.channels
    if channels is None:
        return slice(0, total)
    start, stop, step = channels.indices(total)
    requested = (channels.start, channels.stop)
    if step != 1 or start >= stop or any(v is not None and not 0 <= v <= total for v in requested):
        raise BadInputError(
            f"out_channels {channels} is not a non-empty contiguous range within [0, {total}) for {target.name!r}"
        )
    return slice(start, stop)
