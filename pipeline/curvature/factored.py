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
Columns from transpose rules (``columns.rule_graph``) stream: each chunk is folded
in and dropped, the support having been found first.

Only exact under that condition: callers must run ``check_suffix`` first.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.columns import factor_columns, rule_backward, rule_forward, rule_graph, rule_support, support_positions
from pipeline.curvature.layer_rules import activation_has_transpose_rule
from pipeline.curvature.problem import Problem

DEFAULT_MEMORY_BUDGET = 1 << 30
SPARSE_MIN_CLASSES = 64


def dense_products(patches: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """(P, O) float64 sum over examples and columns of the squared filter gradients, all positions."""
    filter_grads = tf.einsum("nsp,cnso->cnpo", patches, columns)
    return tf.cast(tf.reduce_sum(tf.square(filter_grads), axis=(0, 1)), tf.float64)


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
        self.factor_width = problem.loss.factor_width(int(np.prod(target.model.outputs[0].shape[1:])))
        self.positions = int(np.prod(target.layer.output.shape[1:-1]))
        self.memory_budget = memory_budget
        graph = rule_graph(problem, peel_softmax) if activation_has_transpose_rule(target.layer) else None
        self.column_method = "autodiff" if graph is None else "rules"
        # through the rules the loss gradient rides as one more column
        self.column_chunk = min(column_chunk, self.factor_width + (graph is not None))
        if graph is None:
            self._columns = tf.function(lambda x, y, ids, start, stop: factor_columns(problem, x, y, ids, start, stop, peel_softmax))
        else:
            self._forward = tf.function(lambda x, y: rule_forward(problem, graph, x, y, peel_softmax))
            self._backward = tf.function(lambda state, ids, start, stop: rule_backward(problem, graph, state, ids, start, stop))
            self._support = tf.function(lambda state, start, stop: rule_support(problem, graph, state, start, stop))
        self._patches = tf.function(target.input_patches)
        self.sparse = self.factor_width >= SPARSE_MIN_CLASSES
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
            per_example, columns_at_once = 2 * 4 * self.factor_width * positions * width, self.factor_width
        else:
            support = min(self.factor_width, positions)
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

    def _column_ids(self, wanted: list[int]):
        """``wanted`` column ids in chunks of ``column_chunk``, the last padded with the factor's zero column (id
        ``factor_width``), which adds nothing; id ``factor_width + 1`` is the loss gradient."""
        for c0 in range(0, len(wanted), self.column_chunk):
            chunk = wanted[c0 : c0 + self.column_chunk]
            yield tf.constant(chunk + [self.factor_width] * (self.column_chunk - len(chunk)), tf.int32)

    @staticmethod
    def _by_channels(products, out_channels: int, width: int) -> tf.Tensor:
        return tf.concat([products(o, o + width) for o in range(0, out_channels, width)], axis=1)

    def _kept_columns_diagonal(self, x, y, channels: slice, width: int) -> tf.Tensor:
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        columns = np.empty((self.factor_width, len(x), self.positions, channels.stop - channels.start), np.float32)
        for ids in self._column_ids(list(range(self.factor_width))):
            c0 = int(ids[0])
            columns[c0 : c0 + self.column_chunk] = self._columns(x, y, ids, *bounds).numpy()[: self.factor_width - c0]
        patches = self._patches(x)
        return self._by_channels(lambda o, end: self._products(patches, columns[..., o:end]), columns.shape[-1], width)

    def _streamed_derivatives(self, x, y, channels: slice, width: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        state, patches, loss = self._forward(x, y)
        chunks = list(self._column_ids([*range(self.factor_width), self.factor_width + 1]))
        at = self.factor_width % self.column_chunk  # the gradient column's place in the last chunk
        gradient = []

        def factor_chunks():
            """Chunks of back-propagated factor columns; the gradient column, which rides in the last, goes to
            ``gradient``."""
            for index, ids in enumerate(chunks):
                columns = self._backward(state, ids, *bounds)
                if index == len(chunks) - 1:
                    gradient.append(self._gradient(patches, columns[at:]))
                    columns = columns[:at]
                if columns.shape[0]:
                    yield columns

        diagonal = self._streamed_diagonal(state, patches, bounds, channels.stop - channels.start, width, factor_chunks())
        return gradient[0], diagonal, loss

    def _streamed_diagonal(self, state, patches, bounds, out_channels: int, width: int, column_chunks) -> tf.Tensor:
        if self.sparse:
            positions = self._support(state, *bounds)
            if positions.shape[-1] < self.factor_width:
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
