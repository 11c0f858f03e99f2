"""Is everything between a target's stage and the loss piecewise linear, and which operations come after it?

When it is, the suffix's second-order terms vanish almost everywhere and the factored engine is
exact. The answer comes from the table of layer facts (``layer_facts``) step by step over the
model's flattened graph (``graph``); an operation the table does not describe makes the suffix "not
piecewise linear", so the check can be wrong only by refusing, never by approximating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from pipeline.curvature.graph import Suffix, flat_steps, suffix_of
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


def peeled_softmax(model: keras.Model, loss: Loss):
    """The final Keras softmax a cross-entropy folds in (None for other losses or without one): Keras'
    cross-entropy of a Keras softmax's output uses its logits, with ``from_logits`` or without."""
    return final_softmax(model) if loss.is_cross_entropy else None


def containing_step(target: Target):
    """The graph step whose operation is the target layer or contains it as a sublayer (``mha/query``)."""
    steps, _, _ = flat_steps(target.model)
    for step in steps:
        if step.operation is target.layer:
            return step
    for step in steps:
        if step.operation is not None and any(inner is target.layer for inner in step.operation._flatten_layers(include_self=False)):
            return step
    raise ValueError(f"layer {target.path!r} is not reached by model {target.model.name!r}'s graph")


def target_suffix(target: Target, loss: Loss) -> Suffix | None:
    """The ``Suffix`` after ``target``'s layer, or None when the target is a sublayer of another layer."""
    if containing_step(target).operation is not target.layer:
        return None
    return suffix_of(target.model, [target.layer], peeled=peeled_softmax(target.model, loss))


def check_suffix(target: Target, loss: Loss) -> SuffixCheck:
    """Inspect the target's own activation and every operation after it."""
    softmax = peeled_softmax(target.model, loss)
    suffix = target_suffix(target, loss)
    if suffix is None:
        step = containing_step(target)
        offending = [f"{target.path} is inside {step.label}, which the engines treat as a whole"]
    else:
        offending = list(suffix.offending)
    if loss.is_cross_entropy and not loss.from_logits and softmax is None:
        offending.append("loss (cross-entropy on probabilities without a final softmax)")
    return SuffixCheck(piecewise_linear=not offending, offending=tuple(offending), peel_softmax=softmax is not None)


def suffix_steps(target: Target) -> list:
    """The graph steps after the target (its containing layer's first, for a sublayer), nested models flattened."""
    step = containing_step(target)
    steps, _, _ = flat_steps(target.model)
    downstream = set(step.outputs)
    found = [] if step.operation is target.layer else [step]
    for other in steps[steps.index(step) + 1:]:
        if any(i in downstream for i in other.inputs):
            downstream.update(other.outputs)
            if other.operation is not None:
                found.append(other)
    return found


def suffix_operations(target: Target) -> list:
    """The operations after the target (its containing layer, for a sublayer, first), nested models flattened."""
    return [step.operation for step in suffix_steps(target)]


def suffix_floats(target: Target) -> int:
    """Entries per example of every output the operations after the target compute: the state one
    product direction through the suffix carries, per example."""
    return sum(math.prod(int(d) for d in output.shape[1:]) for step in suffix_steps(target) for output in step.node.outputs)
