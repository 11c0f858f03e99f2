"""Is everything between the target layer and the loss piecewise linear?

When it is, the suffix's second-order terms vanish almost everywhere and the
factored engine is exact. The answer comes from the table of layer facts (``layer_rules``);
an unlisted layer type or activation makes the suffix "not piecewise linear",
so the check can be wrong only by refusing, never by approximating.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from pipeline.curvature.layer_rules import AFFINE_LAYERS, PIECEWISE_LINEAR_ACTIVATIONS, PIECEWISE_LINEAR_LAYERS, activation_name
from pipeline.curvature.problem import final_softmax
from pipeline.curvature.target import Target
from pipeline.losses import Loss

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
        name = activation_name(layer)
        if name in PIECEWISE_LINEAR_ACTIVATIONS:
            return None
        return f"{layer.name} ({type(layer).__name__} with activation {name!r})"
    return f"{layer.name} ({type(layer).__name__})"


def check_suffix(target: Target, loss: Loss) -> SuffixCheck:
    """Inspect the target's own activation and every downstream layer."""
    softmax = final_softmax(target.model) if loss.is_cross_entropy and not loss.from_logits else None
    offending = []
    own = activation_name(target.layer)
    if own not in PIECEWISE_LINEAR_ACTIVATIONS and target.layer is not softmax:
        offending.append(f"{target.layer.name} (own activation {own!r})")
    for layer in suffix_layers(target):
        problem = _layer_problem(layer, softmax)
        if problem:
            offending.append(problem)
    if loss.is_cross_entropy and not loss.from_logits and softmax is None:
        offending.append("loss (cross-entropy on probabilities without a final softmax)")
    return SuffixCheck(piecewise_linear=not offending, offending=tuple(offending), peel_softmax=softmax is not None)
