"""The model as a flat list of steps, and the part of it that comes after the targets.

Keras keeps a functional model as nodes by depth, nested models (and a Sequential's inner
Functional) as single nodes with graphs of their own, and ``keras.ops`` calls (``x + 3``) as
operation nodes that are not layers. ``flat_steps`` expands all of it into one list of steps in
evaluation order, nested graphs joined by alias steps that pass a tensor on unchanged. A
``Suffix`` is the steps after a set of target layers: what the factored engine walks forwards
once and backwards once per chunk of columns, and what decides whether it is exact (every step
piecewise linear in the tensors that depend on a target).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from pipeline.curvature.layer_facts import (AFFINE_RULE, IDENTITY_RULE, VJP_RULE, TransposeRule, activation_is_piecewise_linear,
                                            activation_name, facts_of, transpose_rule)


@dataclass(frozen=True)
class Step:
    """One operation of the flattened graph; ``operation`` None is an alias (the value passes unchanged)."""

    operation: object | None
    node: object | None
    path: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.path} ({type(self.operation).__name__})"


def graph_of(model: keras.Model):
    """The object that owns a model's nodes: a Sequential's inner Functional, else the model."""
    return model._functional if isinstance(model, keras.Sequential) else model


def is_nested(operation) -> bool:
    return isinstance(operation, keras.Model)


def flat_steps(model: keras.Model, prefix: str = "") -> tuple[list[Step], list[int], list[int]]:
    """(steps in evaluation order, ids of the input tensors, ids of the output tensors) of ``model``'s graph."""
    graph = graph_of(model)
    nodes = [n for depth in sorted(graph._nodes_by_depth, reverse=True) for n in graph._nodes_by_depth[depth]]
    steps: list[Step] = []
    for node in nodes:
        if node.is_input:
            continue
        operation = node.operation
        inputs = tuple(id(t) for t in node.input_tensors)
        outputs = tuple(id(t) for t in node.outputs)
        if is_nested(operation):
            inner, inner_inputs, inner_outputs = flat_steps(operation, f"{prefix}{operation.name}/")
            steps += [Step(None, None, operation.name, (outer,), (mine,)) for outer, mine in zip(inputs, inner_inputs)]
            steps += inner
            steps += [Step(None, None, operation.name, (mine,), (outer,)) for mine, outer in zip(inner_outputs, outputs)]
            continue
        steps.append(Step(operation, node, f"{prefix}{operation.name}", inputs, outputs))
    return steps, [id(t) for t in graph.inputs], [id(t) for t in graph.outputs]


def output_operation(model: keras.Model):
    """The operation that produces the model's single output, seen through nested models."""
    steps, _, outputs = flat_steps(model)
    if len(outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(outputs)} outputs; exactly one is supported")
    producer = {out: step for step in steps for out in step.outputs}
    step = producer[outputs[0]]
    while step.operation is None:
        step = producer[step.inputs[0]]
    return step.operation


@dataclass(frozen=True)
class Suffix:
    """The steps that read a tensor depending on one of ``layers`` (those layers' own steps included).

    ``feeds``: the tensors these steps read that no target influences (computed by ``prefix``, the
    other steps they need); ``rules``: each step's transpose rule; ``offending``: why steps are not
    piecewise linear in their dependent inputs (empty when the factored engine is exact here);
    ``fallbacks``: steps whose settings no dedicated rule covers, back-propagated by autodiff at their
    input instead; ``output``: the model output's id.
    """

    steps: tuple[Step, ...]
    rules: tuple[TransposeRule, ...]
    prefix: tuple[Step, ...]
    feeds: frozenset
    downstream: frozenset
    inputs: tuple[int, ...]
    output: int
    offending: tuple[str, ...]
    fallbacks: tuple[str, ...]
    target_steps: dict

    @property
    def piecewise_linear(self) -> bool:
        return not self.offending


def suffix_of(model: keras.Model, layers, peeled=None) -> Suffix:
    """The ``Suffix`` after the target ``layers`` (each the operation of exactly one step); ``peeled`` is a final
    softmax folded into the loss (its step counts as the identity)."""
    steps, inputs, outputs = flat_steps(model)
    if len(outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(outputs)} outputs; exactly one is supported")
    wanted = {id(layer): layer for layer in layers}
    target_steps: dict[int, int] = {}
    downstream: set[int] = set()
    chosen, rules, offending, fallbacks = [], [], [], []
    for step in steps:
        is_target = step.operation is not None and id(step.operation) in wanted
        dependent = tuple(i in downstream for i in step.inputs)
        if not is_target and not any(dependent):
            continue
        if is_target:
            if id(step.operation) in target_steps:
                raise ValueError(f"layer {step.path!r} is called more than once")
            target_steps[id(step.operation)] = len(chosen)
        downstream.update(step.outputs)
        chosen.append(step)
        rule, problem, fallback = _rule_of(step, dependent, peeled, own_input=is_target and not any(dependent))
        rules.append(rule)
        if problem:
            offending.append(problem)
        if fallback:
            fallbacks.append(step.label)
    missing = [layer.name for key, layer in wanted.items() if key not in target_steps]
    if missing:
        raise ValueError(f"layers {missing} are not steps of model {model.name!r}'s graph")
    reads = {i for step in chosen for i in step.inputs} - downstream
    prefix = _needed(steps, reads, set(inputs))
    return Suffix(tuple(chosen), tuple(rules), tuple(prefix), frozenset(reads), frozenset(downstream), tuple(inputs),
                  outputs[0], tuple(offending), tuple(fallbacks), target_steps)


def _rule_of(step: Step, dependent: tuple[bool, ...], peeled, own_input: bool) -> tuple[TransposeRule | None, str | None, bool]:
    """(transpose rule, why the step is not piecewise linear or None, whether the rule is the autodiff fallback).

    ``own_input``: the step is a target that depends on no other, so only what its layer does after the
    target's stage counts (its activation), not how it depends on its input.
    """
    operation = step.operation
    if operation is None:
        return IDENTITY_RULE, None, False
    if peeled is not None and operation is peeled:  # its softmax is part of the loss: what remains is linear
        if isinstance(operation, (keras.layers.Softmax, keras.layers.Activation)):
            return IDENTITY_RULE, None, False
        return AFFINE_RULE, None, False
    facts = facts_of(operation)
    if facts is None:
        return None, step.label, False
    if own_input:
        linear_after = activation_is_piecewise_linear(operation)
        return AFFINE_RULE, None if linear_after else f"{step.path} (own activation {activation_name(operation)!r})", False
    if not facts.piecewise_linear(operation, dependent):
        return None, _why_not(step), False
    rule = transpose_rule(operation)
    if rule is None:
        return VJP_RULE, None, True
    return rule, None, False


def _why_not(step: Step) -> str:
    name = activation_name(step.operation)
    if name not in (None, "linear"):
        return f"{step.path} ({type(step.operation).__name__} with activation {name!r})"
    return step.label


def _needed(steps: list[Step], wanted: set[int], available: set[int]) -> list[Step]:
    """The steps (in order) that compute the tensors ``wanted`` from ``available`` ones."""
    producer = {out: index for index, step in enumerate(steps) for out in step.outputs}
    needed: set[int] = set()
    frontier = [i for i in wanted if i not in available]
    while frontier:
        tensor = frontier.pop()
        index = producer[tensor]
        if index in needed:
            continue
        needed.add(index)
        frontier += [i for i in steps[index].inputs if i not in available]
    return [steps[i] for i in sorted(needed)]
