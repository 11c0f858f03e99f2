"""Exact Hessian diagonal for piecewise-linear suffixes via loss-Hessian factors.

If every op after z is piecewise linear, H_z = Jᵀ H_loss J with J = d logits / dz,
and H_loss = S Sᵀ per example. Back-propagating the C columns of S to z gives
V_c, and

    H_W[p, o] = sum_{n, c} (sum_s patches[n, s, p] V_c[n, s, o])².

Two savings make this fast, both exact:

* Support: for a given example and output channel, V_c vanishes at the same
  positions for every column c (ReLU masks and max-pool routing do not depend
  on c). Only the A active positions (at most a quarter of S behind a 2x2
  max-pool) are gathered.
* Gram form: sum_c (v_cᵀ P)² = Pᵀ (Σ_c v_c v_cᵀ) P, so with M = VᵀV (A x A) the
  diagonal is sum_a P ⊙ (M P), costing A²(C + P) instead of C·A·P; used when
  A < C (e.g. VGG16: C = 1000 classes, A <= 196).

With few outputs (C < SPARSE_MIN_CLASSES) one dense product over all positions
is a single efficient matrix product and beats gathering; both paths are exact.

Only exact under that condition: callers must run ``check_suffix`` first.
"""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.layer_rules import (IDENTITY_RULE, activation_has_transpose_rule, activation_name, activation_slope,
                                             transpose_rule)
from pipeline.curvature.problem import Problem, logits_output, output_layer

DEFAULT_MEMORY_BUDGET = 1 << 30
SPARSE_MIN_CLASSES = 64


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


def rule_chain(problem: Problem, peel_softmax: bool) -> list | None:
    """(layer, rule) for the layers after the target, in order, when they form a chain that transpose
    rules cover (a peeled final softmax counts as the identity); else None.

    Then the factor columns go back through one batched op per layer (``rule_columns``);
    any other suffix (branches, merges, layers without a rule) uses autodiff (``factor_columns``).
    """
    target = problem.target
    last = output_layer(target.model)
    if len(target.layer._inbound_nodes) != 1:
        return None
    layer, chain = target.layer, []
    with logits_if_peeled(target.model, peel_softmax):
        while layer is not last:
            if len(layer._outbound_nodes) != 1:
                return None
            node = layer._outbound_nodes[0]
            layer = node.operation
            peeled = peel_softmax and layer is last and isinstance(layer, keras.layers.Softmax)
            rule = IDENTITY_RULE if peeled else transpose_rule(layer)
            if len(node.arguments.keras_tensors) != 1 or len(layer._inbound_nodes) != 1 or rule is None:
                return None
            chain.append((layer, rule))
    return chain


def rule_forward(problem: Problem, chain: list, x, y, peel_softmax: bool) -> tuple:
    """One forward pass through a ``rule_chain``: what the transposes need, and the loss-Hessian factor
    (N, C, K + 1) with a zero last column for padding. Shared by every column chunk of these examples."""
    target = problem.target
    z = target.pre_activation(target.layer_input(x))
    with logits_if_peeled(target.model, peel_softmax):
        h = target.layer.activation(z)
        saved = []
        for layer, rule in chain:
            h, kept = rule.forward(layer, h)
            saved.append(kept)
    factor = with_zero_column(problem.loss.hessian_factor(tf.reshape(h, (tf.shape(x)[0], -1)), y))
    return saved, activation_slope(activation_name(target.layer), z), factor, tf.shape(h)[1:]


def rule_backward(problem: Problem, chain: list, forward: tuple, column_ids, start, stop) -> tf.Tensor:
    """The factor columns ``column_ids`` back-propagated through a ``rule_chain``: (K, N, S, stop - start)."""
    saved, mask, factor, output_shape = forward
    v = tf.transpose(tf.gather(factor, column_ids, axis=2), (2, 0, 1))  # (K, N, C)
    v = tf.reshape(v, tf.concat([tf.shape(v)[:2], output_shape], 0))
    for (layer, rule), kept in zip(reversed(chain), reversed(saved)):
        v = rule.transpose(layer, kept, v)
    v = v if mask is None else v * mask
    return tf.reshape(v, (tf.shape(v)[0], tf.shape(v)[1], -1, problem.target.out_channels))[..., start:stop]


def rule_columns(problem: Problem, chain: list, x, y, column_ids, start, stop, peel_softmax: bool) -> tf.Tensor:
    """``factor_columns`` through a ``rule_chain``: (K, N, S, O), the same values."""
    return rule_backward(problem, chain, rule_forward(problem, chain, x, y, peel_softmax), column_ids, start, stop)


def dense_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 sum over examples and columns of the squared filter gradients, all positions."""
    filter_grads = tf.einsum("nsp,cnso->cnpo", patches, columns)
    return tf.cast(tf.reduce_sum(tf.square(filter_grads), axis=(0, 1)), tf.float64)


def support_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 sum over examples and columns of the squared filter gradients.

    ``patches`` is (N, S, P), ``columns`` is (C, N, S, O).
    """
    classes = tf.shape(columns)[0]
    active = tf.transpose(tf.reduce_any(columns != 0, axis=0), (0, 2, 1))  # (N, O, S)
    width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(active, tf.int32), axis=-1)), 1)
    positions = tf.math.top_k(tf.cast(active, tf.int32), k=width, sorted=False).indices  # (N, O, A)
    gathered = tf.gather(patches, positions, batch_dims=1)  # (N, O, A, P)
    values = tf.gather(tf.transpose(columns, (1, 3, 0, 2)), positions, axis=3, batch_dims=2)  # (N, O, C, A)

    def gram():
        m = tf.einsum("noca,nocb->noab", values, values)
        return tf.reduce_sum(gathered * tf.einsum("noab,nobp->noap", m, gathered), axis=(0, 2))

    def direct():
        return tf.reduce_sum(tf.square(tf.einsum("noca,noap->nocp", values, gathered)), axis=(0, 2))

    per_channel = tf.cond(width < classes, gram, direct)  # (O, P)
    return tf.transpose(tf.cast(per_channel, tf.float64))


class FactoredEngine:
    """Per-batch factored diagonal; examples are processed in chunks that fit ``memory_budget`` bytes."""

    name = "factored"

    def __init__(self, problem: Problem, peel_softmax: bool, column_chunk: int = 16, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        target = problem.target
        self.classes = int(np.prod(target.model.outputs[0].shape[1:]))
        self.positions = int(np.prod(target.layer.output.shape[1:-1]))
        self.column_chunk = min(column_chunk, self.classes)
        self.memory_budget = memory_budget
        chain = rule_chain(problem, peel_softmax) if activation_has_transpose_rule(target.layer) else None
        self.column_method = "autodiff" if chain is None else "rules"
        if chain is None:
            columns = tf.function(lambda x, y, ids, start, stop: factor_columns(problem, x, y, ids, start, stop, peel_softmax))
            self._column_source = lambda x, y: functools.partial(columns, x, y)
        else:
            forward = tf.function(lambda x, y: rule_forward(problem, chain, x, y, peel_softmax))
            backward = tf.function(lambda state, ids, start, stop: rule_backward(problem, chain, state, ids, start, stop))
            self._column_source = lambda x, y: functools.partial(backward, forward(x, y))
        self._patches = tf.function(target.input_patches)
        self.sparse = self.classes >= SPARSE_MIN_CLASSES
        self._products = tf.function(support_products if self.sparse else dense_products)

    def chunk_sizes(self, channels: slice) -> tuple[int, int]:
        """(examples, output channels) per product call so that columns and products fit the memory budget.

        The factor columns of a chunk of examples take 4·C·S·O bytes; the products of a chunk of
        channels take 4·(2·S·P) bytes per channel and example (gathered patches and M·P) on the
        sparse path, 4·C·P on the dense one.
        """
        positions, features = self.positions, int(np.prod(self.problem.target.shape[:-1]))
        width = channels.stop - channels.start
        examples = max(1, self.memory_budget // (2 * 4 * self.classes * positions * width))
        per_channel = 4 * examples * (2 * positions * features if self.sparse else self.classes * features)
        return examples, max(1, min(width, self.memory_budget // (2 * per_channel)))

    def batch_diagonal(self, x, y, channels: slice) -> np.ndarray:
        """(P, O) sum over the batch of the diagonal for output channels ``channels``."""
        classes = self.classes
        examples, width = self.chunk_sizes(channels)
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        total = None
        for first in range(0, len(x), examples):
            xs, ys = x[first : first + examples], y[first : first + examples]
            columns_for = self._column_source(xs, ys)
            columns = np.empty((classes, len(xs), self.positions, channels.stop - channels.start), np.float32)
            for c0 in range(0, classes, self.column_chunk):
                ids = np.minimum(np.arange(c0, c0 + self.column_chunk), classes)  # index ``classes`` is the zero column
                chunk = columns_for(tf.constant(ids, tf.int32), *bounds).numpy()
                columns[c0 : c0 + self.column_chunk] = chunk[: classes - c0]
            patches = self._patches(xs)
            parts = [self._products(patches, columns[..., o : o + width]).numpy() for o in range(0, columns.shape[-1], width)]
            part = np.concatenate(parts, axis=1)
            total = part if total is None else total + part
        return total
