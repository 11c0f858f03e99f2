"""Exact Hessian diagonal for any differentiable suffix, one HVP per entry.

For entry j = (p, o) of W the direction in z-space is u_j = dz/dW_j: the
input patches at feature p, placed in output channel o. Then
H_W[j, j] = <u_j, H_z u_j>, with H_z u_j a forward-over-reverse product taken
w.r.t. z (not W), vectorized over a chunk of entries.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from pipeline.curvature.autodiff import hvp
from pipeline.curvature.problem import Problem


def entry_curvatures(problem: Problem, x, y, p_ids: tf.Tensor, o_ids: tf.Tensor) -> tf.Tensor:
    """Sum over the batch of H_W[j, j] for the entries j = (p_ids[k], o_ids[k])."""
    target = problem.target
    a = target.layer_input(x)
    patches = target.patches(a)
    z = target.pre_activation(a)
    channels = z.shape[-1]

    def loss_of(delta):
        return problem.loss_sum(x, y, delta)

    def one(ids):
        column = tf.gather(patches, ids[0], axis=2)
        u = tf.reshape(column[:, :, None] * tf.one_hot(ids[1], channels, dtype=z.dtype), tf.shape(z))
        hu = target.flat_output(hvp(loss_of, tf.zeros_like(z), u))
        return tf.reduce_sum(column * tf.gather(hu, ids[1], axis=2))

    return tf.vectorized_map(one, tf.stack([p_ids, o_ids], axis=1))


class ExactEngine:
    """Per-batch exact diagonal, ``chunk_size`` entries vectorized per call."""

    name = "exact"

    def __init__(self, problem: Problem, chunk_size: int = 128):
        self.problem = problem
        self.chunk_size = chunk_size
        self._curvatures = tf.function(lambda x, y, p, o: entry_curvatures(problem, x, y, p, o))

    def batch_diagonal(self, x, y, channels: slice) -> tf.Tensor:
        """(P, O) sum over the batch of the diagonal for output channels ``channels``."""
        features = int(tf.reduce_prod(self.problem.target.shape[:-1]))
        outs = channels.stop - channels.start
        p_ids = tf.tile(tf.range(features, dtype=tf.int32), [outs])
        o_ids = tf.repeat(tf.range(channels.start, channels.stop, dtype=tf.int32), features)
        total = features * outs
        pieces = []
        for start in range(0, total, self.chunk_size):
            stop = min(start + self.chunk_size, total)
            p_chunk, o_chunk = self._padded(p_ids[start:stop]), self._padded(o_ids[start:stop])
            pieces.append(self._curvatures(x, y, p_chunk, o_chunk)[: stop - start])
        flat = tf.concat(pieces, axis=0)
        return tf.transpose(tf.reshape(flat, (outs, features)))

    def entries(self, channels: slice) -> int:
        return int(np.prod(self.problem.target.shape[:-1])) * (channels.stop - channels.start)

    def time_chunk(self, x, y) -> float:
        """Seconds for one vectorized chunk of entries on examples ``x``: the unit of this engine's cost."""
        ids = tf.zeros([self.chunk_size], tf.int32)
        started = time.perf_counter()
        self._curvatures(x, y, ids, ids).numpy()
        return time.perf_counter() - started

    def _padded(self, ids: tf.Tensor) -> tf.Tensor:
        """Pad to the chunk size so every call reuses one traced graph."""
        missing = self.chunk_size - int(ids.shape[0])
        return tf.concat([ids, tf.zeros([missing], tf.int32)], axis=0) if missing else ids


def exact_entries(problem: Problem, batches, indices: list[tuple[int, ...]]) -> np.ndarray:
    """Mean-loss Hessian-diagonal entries at multi-indices of W by the exact engine (a spot check)."""
    shape = problem.target.shape
    flat = np.array([np.ravel_multi_index(i[:-1], shape[:-1]) for i in indices], np.int32)
    outs = np.array([i[-1] for i in indices], np.int32)
    total, examples = np.zeros(len(indices)), 0
    for x, y in batches:
        total += entry_curvatures(problem, tf.constant(x), tf.constant(y), tf.constant(flat), tf.constant(outs)).numpy()
        examples += len(x)
    return total / examples
