"""Is everything between the target layer and the loss piecewise linear?

When it is, the suffix's second-order terms vanish almost everywhere and the
factored engine is exact. The answer comes from one table of Keras layer types;
an unlisted layer type or activation makes the suffix "not piecewise linear",
so the check can be wrong only by refusing, never by approximating.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from pipeline.curvature.problem import final_softmax
from pipeline.curvature.target import Target
from pipeline.losses import Loss

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


@dataclass(frozen=True)
class SuffixCheck:
    """Outcome of inspecting the suffix: whether it is piecewise linear and why not."""

    piecewise_linear: bool
    offending: tuple[str, ...]
    peel_softmax: bool

    @property
    def reason(self) -> str:
        if self.piecewise_linear:
            peeled = " (final softmax folded into the cross-entropy)" if self.peel_softmax else ""
            return f"every op after the target layer is piecewise linear{peeled}"
        return "not piecewise linear after the target layer: " + ", ".join(self.offending)


def _activation_name(layer) -> str:
    return getattr(layer.activation, "__name__", type(layer.activation).__name__)


def suffix_layers(target: Target) -> list[keras.layers.Layer]:
    """Layers downstream of the target layer, in discovery order."""
    seen: dict[int, keras.layers.Layer] = {}
    frontier = [target.layer]
    while frontier:
        layer = frontier.pop()
        for node in layer._outbound_nodes:
            nxt = node.operation
            if id(nxt) not in seen and nxt is not target.model:
                seen[id(nxt)] = nxt
                frontier.append(nxt)
    return list(seen.values())


def _layer_problem(layer, allowed_softmax) -> str | None:
    """Why ``layer`` is not piecewise linear, or None when it is."""
    if isinstance(layer, keras.Model):
        nested = [_layer_problem(inner, None) for inner in layer.layers]
        found = [p for p in nested if p]
        return f"{layer.name} ({'; '.join(found)})" if found else None
    if layer is allowed_softmax:
        return None
    if isinstance(layer, PIECEWISE_LINEAR_LAYERS):
        return None
    if isinstance(layer, AFFINE_LAYERS):
        name = _activation_name(layer)
        if name in PIECEWISE_LINEAR_ACTIVATIONS:
            return None
        return f"{layer.name} ({type(layer).__name__} with activation {name!r})"
    return f"{layer.name} ({type(layer).__name__})"


def check_suffix(target: Target, loss: Loss) -> SuffixCheck:
    """Inspect the target's own activation and every downstream layer."""
    softmax = final_softmax(target.model) if loss.is_cross_entropy and not loss.from_logits else None
    offending = []
    own = _activation_name(target.layer)
    if own not in PIECEWISE_LINEAR_ACTIVATIONS and target.layer is not softmax:
        offending.append(f"{target.layer.name} (own activation {own!r})")
    for layer in suffix_layers(target):
        problem = _layer_problem(layer, softmax)
        if problem:
            offending.append(problem)
    if loss.is_cross_entropy and not loss.from_logits and softmax is None:
        offending.append("loss (cross-entropy on probabilities without a final softmax)")
    return SuffixCheck(piecewise_linear=not offending, offending=tuple(offending), peel_softmax=softmax is not None)
