"""Second derivatives of plain TensorFlow functions.

These answer the library-level questions hessdiag was born from: Hessian
diagonals without forming the Hessian, row-wise Laplacians, the full flat
Hessian over several variables (off-diagonal blocks included), and
per-example Hessians without the (N, K, N, K) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

DEFAULT_DIRECTION_CHUNK = 256


def hvp(f: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """Hessian-vector product H(x) v of scalar ``f`` by forward-over-reverse mode."""
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = f(x)
        grad = tape.gradient(value, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return acc.jvp(grad, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _directional_curvatures(
    f: Callable[[tf.Tensor], tf.Tensor],
    x: tf.Tensor,
    direction: Callable[[tf.Tensor], tf.Tensor],
    reduce: Callable[[tf.Tensor], tf.Tensor],
    count: int,
    chunk_size: int,
) -> tf.Tensor:
    """Stack ``reduce(v_k * H v_k)`` for ``v_k = direction(k)``, k < count.

    ``chunk_size`` directions are vectorized at a time, which bounds memory.
    """

    def one(k):
        v = direction(k)
        return reduce(v * hvp(f, x, v))

    results = [
        tf.vectorized_map(one, tf.range(start, min(start + chunk_size, count)))
        for start in range(0, count, chunk_size)
    ]
    return tf.concat(results, axis=0)


def hessian_diagonal(
    f: Callable[[tf.Tensor], tf.Tensor], x, *, chunk_size: int = DEFAULT_DIRECTION_CHUNK
) -> tf.Tensor:
    """Diagonal of the Hessian of scalar ``f`` at ``x``, shaped like ``x``.

    One Hessian-vector product per entry, ``chunk_size`` of them vectorized at a
    time, so memory is bounded by ``chunk_size`` copies of f's intermediates and
    the (size x size) Hessian is never formed.

    Example:
        >>> f = lambda v: tf.reduce_prod(v**2 - 3 * v + 1)
        >>> hessian_diagonal(f, tf.constant([[1.0], [2.0], [0.0]])).numpy().ravel()
        array([-2., -2.,  2.], dtype=float32)
    """
    x = tf.convert_to_tensor(x)
    size = int(np.prod(x.shape))

    def direction(k):
        return tf.reshape(tf.one_hot(k, size, dtype=x.dtype), x.shape)

    curvatures = _directional_curvatures(f, x, direction, tf.reduce_sum, size, chunk_size)
    return tf.reshape(curvatures, x.shape)


def rowwise_hessian_diagonal(f: Callable[[tf.Tensor], tf.Tensor], x) -> tf.Tensor:
    """d²f_r/dx_{r,i}² for ``f: (k, n) -> (k,)`` whose rows are independent.

    Because row r of f reads only row r of x, one Hessian-vector product per
    column (n of them, not k*n) gives every row's diagonal at once.

    Example:
        >>> q = tf.constant([[1.0, 2.0, 2.0]])
        >>> f = lambda q: tf.math.log(tf.reduce_sum(q**2, axis=1))
        >>> float(tf.reduce_sum(rowwise_hessian_diagonal(f, q)))  # 2 / r² = 2 / 9
        0.2222...
    """
    x = tf.convert_to_tensor(x)
    rows, cols = x.shape

    def direction(i):
        return tf.broadcast_to(tf.one_hot(i, cols, dtype=x.dtype), (rows, cols))

    total = lambda v: tf.reduce_sum(f(v))  # noqa: E731
    row_sums = lambda c: tf.reduce_sum(c, axis=1)  # noqa: E731
    return tf.transpose(_directional_curvatures(total, x, direction, row_sums, cols, cols))


@dataclass(frozen=True)
class FlatHessian:
    """A full Hessian over several variables flattened in order (C order).

    ``matrix[i, j]`` is d²f / dθ_i dθ_j where θ concatenates the variables;
    ``slices[k]`` and ``shapes[k]`` map variable k's entries in and out of θ.
    """

    matrix: np.ndarray
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]

    def block(self, i: int, j: int) -> np.ndarray:
        """d²f / dvar_i dvar_j shaped ``shapes[i] + shapes[j]``."""
        sub = self.matrix[self.slices[i], self.slices[j]]
        return sub.reshape(self.shapes[i] + self.shapes[j])

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """Split a length-P vector (e.g. the diagonal) back into the variables' shapes."""
        return [np.asarray(flat)[s].reshape(shape) for s, shape in zip(self.slices, self.shapes)]

    def __array__(self, dtype=None, copy=None):
        return self.matrix if dtype is None else self.matrix.astype(dtype)


def flat_hessian(f: Callable[[], tf.Tensor], variables: Sequence[tf.Variable]) -> FlatHessian:
    """Full (P, P) Hessian of the zero-argument scalar ``f`` over ``variables``.

    Unlike ``tf.hessians``, which returns only the diagonal blocks, this keeps
    the cross terms between variables.
    """
    shapes = tuple(tuple(int(d) for d in v.shape) for v in variables)
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = f()
        grads = inner.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat_grad = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    blocks = outer.jacobian(flat_grad, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    del outer
    total = int(offsets[-1])
    matrix = np.concatenate([tf.reshape(b, (total, n)).numpy() for b, n in zip(blocks, sizes)], axis=1)
    slices = tuple(slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:]))
    return FlatHessian(matrix=matrix, shapes=shapes, slices=slices)


def per_example_hessians(f: Callable[[tf.Tensor], tf.Tensor], x) -> tf.Tensor:
    """(N, K, K) Hessians of ``f = sum_n f_n(x_n)`` for ``x`` of shape (N, K).

    The gradient's row n depends only on x_n, so a batch Jacobian of the
    gradient gives every example's Hessian without forming (N, K, N, K).
    Works inside ``tf.function`` with an unknown batch dimension.
    """
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = f(x)
        grad = inner.gradient(value, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return outer.batch_jacobian(grad, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
