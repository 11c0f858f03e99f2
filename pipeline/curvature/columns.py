"""Factor columns: the columns s_c of the loss-Hessian factor back-propagated through the suffix, V_c = Jᵀ s_c.

One forward pass through the ``Suffix`` after the targets (each step by its transpose rule, which
keeps what its Jacobian needs: ReLU masks, max-pool routing, stage inputs) serves every chunk of
columns of those examples; it also gives the loss, the loss-Hessian factor and the loss gradient
(one more column). Each chunk then goes backwards once through every step, as one batched op per
step, summing where branches meet, and is captured at each target's stage on the way: one pass
serves every target. ``factor_columns`` computes the same columns by vectorized autodiff through
the whole model, for one target (a reference, and the Monte-Carlo estimator).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf

from pipeline.curvature.graph import Suffix
from pipeline.curvature.problem import logits_output
from pipeline.losses import Loss


def logits_if_peeled(model, peel_softmax: bool):
    """``logits_output(model)`` when the final softmax is folded into the loss, else a no-op block."""
    return logits_output(model) if peel_softmax else contextlib.nullcontext()


def with_zero_column(factor: tf.Tensor) -> tf.Tensor:
    """The loss-Hessian factor (N, C, K) with a zero column K appended: column ids past the end pad chunks."""
    return tf.concat([factor, tf.zeros_like(factor[:, :, :1])], axis=2)


def factor_columns(problem, x, y, column_ids, start, stop, peel_softmax: bool, factor_fn=None) -> tf.Tensor:
    """V_c = Jᵀ s_c at one target's z for the given factor columns, z channels start:stop: (K, N, S, O).

    ``factor_fn(logits, y)`` gives the factor (N, C, K); the loss's exact factor by default.
    """
    target = problem.target
    u = target.input_stage(x)
    delta = tf.zeros_like(target.pre_activation(u))
    peel = logits_if_peeled(target.model, peel_softmax)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(delta)
        with peel:
            logits = tf.reshape(problem.outputs(x, delta), (tf.shape(x)[0], -1))
    factor = with_zero_column((factor_fn or problem.loss.hessian_factor)(logits, y))

    def column(c):
        v = tape.gradient(logits, delta, output_gradients=tf.gather(factor, c, axis=2))
        return target.flat(v)[:, :, start:stop]

    return tf.vectorized_map(column, column_ids)


class Forward(NamedTuple):
    """What one forward pass through a suffix leaves for the column chunks of its examples.

    ``saved``: each step's rule state; ``factor`` (N, C, K + 2): the loss-Hessian factor with a zero
    column K (pads chunks) and the loss gradient as column K + 1; ``loss``: the summed loss.
    """

    saved: tuple
    factor: tf.Tensor
    output_shape: tf.Tensor
    loss: tf.Tensor


def evaluate(steps, values: dict) -> None:
    """Run ``steps`` as the model does (inference mode), reading and writing tensor values by id."""
    for step in steps:
        if step.operation is None:
            values[step.outputs[0]] = values[step.inputs[0]]
            continue
        args, kwargs = step.node.arguments.fill_in(values)
        out = step.operation(*args, **kwargs)
        for tensor, value in zip(step.outputs, tf.nest.flatten(out)):
            values[tensor] = value


def suffix_forward(suffix: Suffix, model: keras.Model, loss: Loss, x, y, peel_softmax: bool, factor_fn=None) -> Forward:
    """The prefix (plain), then every suffix step by its rule, then the loss and its factor."""
    values = {tensor: value for tensor, value in zip(suffix.inputs, tf.nest.flatten(x))}
    evaluate(suffix.prefix, values)
    saved = []
    with logits_if_peeled(model, peel_softmax):
        for step, rule in zip(suffix.steps, suffix.rules):
            if step.operation is None:
                values[step.outputs[0]] = values[step.inputs[0]]
                saved.append(None)
                continue
            args, kwargs = step.node.arguments.fill_in(values)
            if rule.takes_arguments:
                values[step.outputs[0]], kept = rule.forward(step.operation, args, kwargs)
            else:
                values[step.outputs[0]], kept = rule.forward(step.operation, args[0])
            saved.append(kept)
    h = values[suffix.output]
    outputs = tf.reshape(h, (tf.shape(x)[0], -1))
    loss_fn = dataclasses.replace(loss, from_logits=True) if peel_softmax else loss
    with tf.GradientTape() as tape:
        tape.watch(outputs)
        total = tf.reduce_sum(loss_fn.per_example(outputs, y))
    factor = (factor_fn or loss.hessian_factor)(outputs, y)
    factor = tf.concat([with_zero_column(factor), tape.gradient(total, outputs)[:, :, None]], 2)
    return Forward(tuple(saved), factor, tf.shape(h)[1:], total)


def stage_inputs(suffix: Suffix, forward: Forward, layer) -> tuple:
    """The inputs of ``layer``'s stages in this forward pass (the patches' sources)."""
    return forward.saved[suffix.target_steps[id(layer)]][0]


def site_key(layer, stage: int) -> str:
    """The key of a target layer's stage in ``backward``'s result."""
    return f"{id(layer)}:{stage}"


def backward(suffix: Suffix, forward: Forward, column_ids: tf.Tensor | None, magnitude: bool = False) -> dict:
    """The factor columns ``column_ids`` (or, with ``magnitude``, ones for every output) back-propagated
    through the suffix: {``site_key``: cotangents (K, N, ...) at that stage's z} for every target layer.

    With ``magnitude`` each step goes through |Jᵀ|, so positive cotangents reach, without cancellation,
    every entry any column can reach; a stage reached through a step that cannot give |Jᵀ| maps to None.
    Only where they are positive matters, and for non-negative maps that depends only on where their
    input is: each step's result is cut back to ones there, or through fifty layers of ResNet50 the
    magnitudes overflow to inf, and inf times a mask's zero is NaN, which reads as unreached.
    """
    if magnitude:
        v = tf.ones(tf.concat([[1, tf.shape(forward.factor)[0]], forward.output_shape], 0), forward.factor.dtype)
    else:
        v = tf.transpose(tf.gather(forward.factor, column_ids, axis=2), (2, 0, 1))  # (K, N, C)
        v = tf.reshape(v, tf.concat([tf.shape(v)[:2], forward.output_shape], 0))
    cotangents, unknown = {suffix.output: v}, set()
    captured: dict = {}
    targets = set(suffix.target_steps.values())
    for index in reversed(range(len(suffix.steps))):
        step, rule = suffix.steps[index], suffix.rules[index]
        g = cotangents.pop(step.outputs[0], None)
        if g is None:  # a branch that does not reach the output
            continue
        lost = step.outputs[0] in unknown
        if step.operation is None:
            parts = [g]
        elif index in targets:
            sites: dict = {}
            needed = any(i in suffix.downstream for i in step.inputs)
            parts = [rule.transpose(step.operation, forward.saved[index], g, magnitude, sites=sites, need_input=needed)]
            for stage, cotangent in sites.items():
                captured[site_key(step.operation, stage)] = None if lost else cotangent
            if not needed:
                continue
        else:
            extra = {"node": step.node} if rule.takes_arguments else {}
            parts = rule.transpose(step.operation, forward.saved[index], g, magnitude, **extra)
            parts = parts if len(step.inputs) > 1 else [parts]
            lost = lost or (magnitude and not rule.exact_magnitude)
        for tensor, part in zip(step.inputs, parts):
            if tensor not in suffix.downstream:
                continue
            if magnitude:
                part = tf.cast(part > 0, part.dtype)
            cotangents[tensor] = cotangents[tensor] + part if tensor in cotangents else part
            if lost:
                unknown.add(tensor)
    return captured


def support_positions(active: tf.Tensor) -> tf.Tensor:
    """(N, O, A) indices of the active positions of ``active`` (N, O, S), A the largest count (at least 1)."""
    width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(active, tf.int32), axis=-1)), 1)
    return tf.math.top_k(tf.cast(active, tf.int32), k=width, sorted=False).indices
