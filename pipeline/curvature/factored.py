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
import dataclasses
from dataclasses import dataclass

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


def dense_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 sum over examples and columns of the squared filter gradients, all positions."""
    filter_grads = tf.einsum("nsp,cnso->cnpo", patches, columns)
    return tf.cast(tf.reduce_sum(tf.square(filter_grads), axis=(0, 1)), tf.float64)


def support_positions(active: tf.Tensor) -> tf.Tensor:
    """(N, O, A) indices of the active positions of ``active`` (N, O, S), A the largest count (at least 1)."""
    width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(active, tf.int32), axis=-1)), 1)
    return tf.math.top_k(tf.cast(active, tf.int32), k=width, sorted=False).indices


def support_values(columns: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """(N, O, C, A) entries of ``columns`` (C, N, S, O) at ``positions`` (N, O, A)."""
    return tf.gather(tf.transpose(columns, (1, 3, 0, 2)), positions, axis=3, batch_dims=2)


def gram_update(gram: tf.Tensor, columns: tf.Tensor, positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``gram`` (N, O, A, A) plus Σ_c v_c v_cᵀ over ``columns`` (C, N, S, O) on the support ``positions``,
    and the number of nonzero column entries outside the support (0 unless the support is wrong)."""
    values = support_values(columns, positions)
    outside = tf.math.count_nonzero(columns) - tf.math.count_nonzero(values)
    return gram + tf.einsum("noca,nocb->noab", values, values), outside


def gram_products(patches: tf.Tensor, positions: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 Σ_n Σ_a P ⊙ (M P) with the patches gathered at ``positions``: Σ_c (v_cᵀ P)²."""
    gathered = tf.gather(patches, positions, batch_dims=1)  # (N, O, A, P)
    per_channel = tf.reduce_sum(gathered * tf.einsum("noab,nobp->noap", gram, gathered), axis=(0, 2))
    return tf.transpose(tf.cast(per_channel, tf.float64))


def support_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 sum over examples and columns of the squared filter gradients.

    ``patches`` is (N, S, P), ``columns`` is (C, N, S, O).
    """
    classes = tf.shape(columns)[0]
    positions = support_positions(tf.transpose(tf.reduce_any(columns != 0, axis=0), (0, 2, 1)))

    def gram():
        shape = tf.concat([tf.shape(positions), tf.shape(positions)[-1:]], 0)
        return gram_products(patches, positions, gram_update(tf.zeros(shape, columns.dtype), columns, positions)[0])

    def direct():
        gathered = tf.gather(patches, positions, batch_dims=1)  # (N, O, A, P)
        values = support_values(columns, positions)
        per_channel = tf.reduce_sum(tf.square(tf.einsum("noca,noap->nocp", values, gathered)), axis=(0, 2))
        return tf.transpose(tf.cast(per_channel, tf.float64))

    return tf.cond(tf.shape(positions)[-1] < classes, gram, direct)


class FactoredEngine:
    """Per-batch factored diagonal; examples are processed in chunks that fit ``memory_budget`` bytes.

    Through a ``rule_graph`` the columns stream: each chunk of K columns is folded into the products
    (dense path) or into each channel's Gram matrix on the support (sparse path) and dropped, so an
    example's C columns are never held at once. Autodiff columns are all kept, then reduced.
    """

    name = "factored"

    def __init__(self, problem: Problem, peel_softmax: bool, column_chunk: int = 16, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        target = problem.target
        self.classes = int(np.prod(target.model.outputs[0].shape[1:]))
        self.positions = int(np.prod(target.layer.output.shape[1:-1]))
        self.column_chunk = min(column_chunk, self.classes)
        self.memory_budget = memory_budget
        graph = rule_graph(problem, peel_softmax) if activation_has_transpose_rule(target.layer) else None
        self.column_method = "autodiff" if graph is None else "rules"
        if graph is None:
            self._columns = tf.function(lambda x, y, ids, start, stop: factor_columns(problem, x, y, ids, start, stop, peel_softmax))
        else:
            self._forward = tf.function(lambda x, y: rule_forward(problem, graph, x, y, peel_softmax))
            self._backward = tf.function(lambda state, ids, start, stop: rule_backward(problem, graph, state, ids, start, stop))
            self._support = tf.function(lambda state, start, stop: rule_support(problem, graph, state, start, stop))
        self._patches = tf.function(target.input_patches)
        self.sparse = self.classes >= SPARSE_MIN_CLASSES
        self._products = tf.function(support_products if self.sparse else dense_products)
        self._dense = tf.function(dense_products, reduce_retracing=True)
        self._gram_update = tf.function(gram_update, reduce_retracing=True)
        self._gram_products = tf.function(gram_products, reduce_retracing=True)
        self._gradient = tf.function(lambda patches, dz: tf.cast(tf.einsum("nsp,nso->po", patches, dz[0]), tf.float64),
                                     reduce_retracing=True)

    def chunk_sizes(self, channels: slice) -> tuple[int, int]:
        """(examples, output channels) per product call so that columns and products fit the memory budget.

        Kept autodiff columns take 4·C·S·O bytes per example; streamed ones about 3 copies of a
        K-column chunk plus the Gram matrices (at most min(C, S)² per channel). The products of a
        chunk of channels take 4·(2·S·P) bytes per channel and example (gathered patches and M·P)
        on the sparse path, 4·K·P on the dense one.
        """
        positions, features = self.positions, int(np.prod(self.problem.target.shape[:-1]))
        width = channels.stop - channels.start
        if self.column_method == "autodiff":
            per_example, columns_at_once = 2 * 4 * self.classes * positions * width, self.classes
        else:
            support = min(self.classes, positions)
            per_example = 4 * width * (3 * self.column_chunk * positions + support * support)
            columns_at_once = self.column_chunk
        examples = max(1, self.memory_budget // per_example)
        per_channel = 4 * examples * (2 * positions * features if self.sparse else columns_at_once * features)
        return examples, max(1, min(width, self.memory_budget // (2 * per_channel)))

    @property
    def streams_gradient(self) -> bool:
        """True when ``batch_derivatives`` gives the gradient from the same forward pass as the columns."""
        return self.column_method == "rules"

    def batch_diagonal(self, x, y, channels: slice) -> np.ndarray:
        """(P, O) sum over the batch of the diagonal for output channels ``channels``."""
        if self.streams_gradient:
            return self.batch_derivatives(x, y, channels)[1]
        examples, width = self.chunk_sizes(channels)
        total = None
        for first in range(0, len(x), examples):
            part = self._kept_columns_diagonal(x[first : first + examples], y[first : first + examples], channels, width).numpy()
            total = part if total is None else total + part
        return total

    def batch_derivatives(self, x, y, channels: slice) -> tuple[np.ndarray, np.ndarray, float]:
        """(P, O) sums over the batch of the gradient and of the diagonal for ``channels``, and the summed loss.

        Through a ``rule_graph`` only: the loss gradient is one more column of the same forward pass.
        """
        examples, width = self.chunk_sizes(channels)
        sums = None
        for first in range(0, len(x), examples):
            part = [t.numpy() for t in self._streamed_derivatives(x[first : first + examples], y[first : first + examples], channels, width)]
            sums = part if sums is None else [a + b for a, b in zip(sums, part)]
        gradient, diagonal, loss = sums
        return gradient, diagonal, float(loss)

    def _column_ids(self):
        """Chunks of column ids; ids past the end name the factor's zero column, which adds nothing."""
        for c0 in range(0, self.classes, self.column_chunk):
            yield tf.constant(np.minimum(np.arange(c0, c0 + self.column_chunk), self.classes), tf.int32)

    @staticmethod
    def _by_channels(products, out_channels: int, width: int) -> tf.Tensor:
        return tf.concat([products(o, o + width) for o in range(0, out_channels, width)], axis=1)

    def _kept_columns_diagonal(self, x, y, channels: slice, width: int) -> tf.Tensor:
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        columns = np.empty((self.classes, len(x), self.positions, channels.stop - channels.start), np.float32)
        for ids in self._column_ids():
            c0 = int(ids[0])
            columns[c0 : c0 + self.column_chunk] = self._columns(x, y, ids, *bounds).numpy()[: self.classes - c0]
        patches = self._patches(x)
        return self._by_channels(lambda o, end: self._products(patches, columns[..., o:end]), columns.shape[-1], width)

    def _streamed_derivatives(self, x, y, channels: slice, width: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        state, patches, loss = self._forward(x, y)
        gradient = self._gradient(patches, self._backward(state, tf.constant([self.classes + 1]), *bounds))
        return gradient, self._streamed_diagonal(state, patches, bounds, channels.stop - channels.start, width), loss

    def _streamed_diagonal(self, state, patches, bounds, out_channels: int, width: int) -> tf.Tensor:
        column_chunks = (self._backward(state, ids, *bounds) for ids in self._column_ids())
        if self.sparse:
            positions = self._support(state, *bounds)
            if positions.shape[-1] < self.classes:
                gram = tf.zeros((*positions.shape, positions.shape[-1]), tf.float32)
                for columns in column_chunks:
                    gram, outside = self._gram_update(gram, columns, positions)
                    if int(outside):
                        raise RuntimeError(f"{int(outside)} factor-column entries lie outside their computed support")
                return self._by_channels(
                    lambda o, end: self._gram_products(patches, positions[:, o:end], gram[:, o:end]), out_channels, width)
        total = None
        for columns in column_chunks:
            part = self._by_channels(lambda o, end: self._dense(patches, columns[..., o:end]), out_channels, width)
            total = part if total is None else total + part
        return total
