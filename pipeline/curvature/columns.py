"""Factor columns: the columns s_c of the loss-Hessian factor back-propagated to the target's z, V_c = Jᵀ s_c.

Two ways, with the same values: vectorized autodiff through any suffix (``factor_columns``),
or, where every layer after the target has a transposed-Jacobian rule (``layer_rules``), one
batched op per layer for a whole chunk of columns, walking the Keras graph after the target
backwards and summing where branches meet (``rule_graph``). One forward pass serves every
chunk; it also gives the loss gradient as one more column and the target's input patches.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import keras
import tensorflow as tf

from pipeline.curvature.layer_rules import IDENTITY_RULE, activation_name, activation_slope, transpose_rule
from pipeline.curvature.problem import Problem, logits_output, output_layer


def logits_if_peeled(model, peel_softmax: bool):
    """``logits_output(model)`` when the final softmax is folded into the loss, else a no-op block."""
    return logits_output(model) if peel_softmax else contextlib.nullcontext()


def with_zero_column(factor: tf.Tensor) -> tf.Tensor:
    """The loss-Hessian factor (N, C, K) with a zero column K appended: column ids past the end pad chunks."""
    return tf.concat([factor, tf.zeros_like(factor[:, :, :1])], axis=2)


def factor_columns(problem: Problem, x, y, column_ids, start, stop, peel_softmax: bool, factor_fn=None) -> tf.Tensor:
    """V_c = Jᵀ s_c for the given factor columns, restricted to channels start:stop: (K, N, S, O).

    ``factor_fn(logits, y)`` gives the factor (N, C, K); the loss's exact factor by default.
    """
    target = problem.target
    a = target.layer_input(x)
    delta = tf.zeros_like(target.pre_activation(a))
    peel = logits_if_peeled(target.model, peel_softmax)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(delta)
        with peel:
            logits = tf.reshape(problem.outputs(x, delta), (tf.shape(x)[0], -1))
    factor = (factor_fn or problem.loss.hessian_factor)(logits, y)
    factor = with_zero_column(factor)

    def column(c):
        v = tape.gradient(logits, delta, output_gradients=tf.gather(factor, c, axis=2))
        return target.flat_output(v)[:, :, start:stop]

    return tf.vectorized_map(column, column_ids)


@dataclass(frozen=True)
class RuleGraph:
    """The layers after the target, each with its transpose rule, in an order that evaluates every input first.

    ``steps`` are (Keras node, rule); ``feeds`` the tensors the steps read that do not depend on the
    target (the target's input first), computed by ``feed_model`` when there are others;
    ``downstream`` the ids of the tensors that do depend on it, from ``start`` (the target's
    output) to ``end`` (the model's output).
    """

    steps: tuple
    feeds: tuple
    start: object
    end: object
    downstream: frozenset
    feed_model: keras.Model | None


def rule_graph(problem: Problem, peel_softmax: bool) -> RuleGraph | None:
    """The ``RuleGraph`` after the target when transpose rules cover every layer there (a peeled final
    softmax counts as the identity) and each is called once; else None.

    Then the factor columns go back through one batched op per layer, branches summing where they
    meet (``rule_columns``); any other suffix uses autodiff (``factor_columns``).
    """
    target = problem.target
    model, last = target.model, output_layer(target.model)
    nodes_by_depth = getattr(getattr(model, "_functional", model), "_nodes_by_depth", None)  # a Sequential wraps a Functional
    if nodes_by_depth is None or len(target.layer._inbound_nodes) != 1:
        return None
    first = target.layer._inbound_nodes[0]
    start, feeds, steps = first.outputs[0], [first.input_tensors[0]], []
    downstream = {id(start)}
    with logits_if_peeled(model, peel_softmax):
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in nodes_by_depth[depth]:
                if not any(id(t) in downstream for t in node.input_tensors):
                    continue
                layer = node.operation
                peeled = peel_softmax and layer is last and isinstance(layer, keras.layers.Softmax)
                rule = IDENTITY_RULE if peeled else transpose_rule(layer)
                if rule is None or len(layer._inbound_nodes) != 1 or len(node.outputs) != 1:
                    return None
                steps.append((node, rule))
                downstream.add(id(node.outputs[0]))
                feeds += [t for t in node.input_tensors if id(t) not in downstream and all(t is not f for f in feeds)]
    end = model.outputs[0]
    if id(end) not in downstream:
        return None
    feed_model = keras.Model(model.inputs, feeds) if len(feeds) > 1 else None
    return RuleGraph(tuple(steps), tuple(feeds), start, end, frozenset(downstream), feed_model)


def rule_forward(problem: Problem, graph: RuleGraph, x, y, peel_softmax: bool) -> tuple:
    """One forward pass through a ``rule_graph``, shared by every column chunk of these examples:
    the state the transposes need (with the loss-Hessian factor (N, C, K + 2): a zero column K pads
    column chunks, column K + 1 is the loss gradient), the target's input patches, the summed loss."""
    target = problem.target
    if graph.feed_model is None:
        fed = [target.layer_input(x)]
    else:
        fed = tf.nest.flatten(graph.feed_model(x, training=False))
    values = {id(t): value for t, value in zip(graph.feeds, fed)}
    a = fed[0]
    z = target.pre_activation(a)
    saved = []
    with logits_if_peeled(target.model, peel_softmax):
        values[id(graph.start)] = target.layer.activation(z)
        for node, rule in graph.steps:
            args, _ = node.arguments.fill_in(values)
            values[id(node.outputs[0])], kept = rule.forward(node.operation, args[0])
            saved.append(kept)
    h = values[id(graph.end)]
    outputs = tf.reshape(h, (tf.shape(x)[0], -1))
    loss = dataclasses.replace(problem.loss, from_logits=True) if peel_softmax else problem.loss
    with tf.GradientTape() as tape:
        tape.watch(outputs)
        total = tf.reduce_sum(loss.per_example(outputs, y))
    factor = tf.concat([with_zero_column(problem.loss.hessian_factor(outputs, y)), tape.gradient(total, outputs)[:, :, None]], 2)
    return (saved, activation_slope(activation_name(target.layer), z), factor, tf.shape(h)[1:]), target.patches(a), total


def rule_backward(problem: Problem, graph: RuleGraph, forward: tuple, column_ids, start, stop) -> tf.Tensor:
    """The factor columns ``column_ids`` back-propagated through a ``rule_graph``: (K, N, S, stop - start)."""
    _, _, factor, output_shape = forward
    v = tf.transpose(tf.gather(factor, column_ids, axis=2), (2, 0, 1))  # (K, N, C)
    return _through_graph(problem, graph, forward, tf.reshape(v, tf.concat([tf.shape(v)[:2], output_shape], 0)), start, stop)


def rule_support(problem: Problem, graph: RuleGraph, forward: tuple, start, stop) -> tf.Tensor:
    """(N, O, A) positions, per example and channel, outside which every factor column vanishes.

    Ones pushed back through |Jᵀ| (every weight by its magnitude) cannot cancel, so they are positive
    wherever any column can be nonzero: ReLU masks and max-pool routing, which do not depend on the
    column, decide the support. A is the largest support; smaller ones are padded with positions
    where the columns vanish.
    """
    _, _, factor, output_shape = forward
    ones = tf.ones(tf.concat([[1, tf.shape(factor)[0]], output_shape], 0), factor.dtype)
    reach = _through_graph(problem, graph, forward, ones, start, stop, magnitude=True)[0]
    return support_positions(tf.transpose(reach > 0, (0, 2, 1)))


def _through_graph(problem: Problem, graph: RuleGraph, forward: tuple, v, start, stop, magnitude: bool = False) -> tf.Tensor:
    """Cotangents (K, N, ...) of the model output back to the target's z, summed where branches meet."""
    saved, mask, _, _ = forward
    cotangents = {id(graph.end): v}
    for (node, rule), kept in zip(reversed(graph.steps), reversed(saved)):
        g = cotangents.pop(id(node.outputs[0]), None)
        if g is None:  # a branch that does not reach the output
            continue
        inputs = node.input_tensors
        parts = rule.transpose(node.operation, kept, g, magnitude)
        for tensor, part in zip(inputs, parts if len(inputs) > 1 else [parts]):
            if id(tensor) in graph.downstream:
                cotangents[id(tensor)] = cotangents[id(tensor)] + part if id(tensor) in cotangents else part
    v = cotangents[id(graph.start)]
    v = v if mask is None else v * mask
    return tf.reshape(v, (tf.shape(v)[0], tf.shape(v)[1], -1, problem.target.out_channels))[..., start:stop]


def rule_columns(problem: Problem, graph: RuleGraph, x, y, column_ids, start, stop, peel_softmax: bool) -> tf.Tensor:
    """``factor_columns`` through a ``rule_graph``: (K, N, S, O), the same values."""
    return rule_backward(problem, graph, rule_forward(problem, graph, x, y, peel_softmax)[0], column_ids, start, stop)


def support_positions(active: tf.Tensor) -> tf.Tensor:
    """(N, O, A) indices of the active positions of ``active`` (N, O, S), A the largest count (at least 1)."""
    width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(active, tf.int32), axis=-1)), 1)
    return tf.math.top_k(tf.cast(active, tf.int32), k=width, sorted=False).indices
