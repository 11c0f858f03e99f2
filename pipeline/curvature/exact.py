"""Exact Hessian diagonal for any differentiable suffix, by Hessian-vector products in z-space.

Entry method (one HVP per entry): for entry j = (p, o) of W the direction in z-space
is u_j = dz/dW_j, the input patches at feature p placed in output channel o, and
H_W[j, j] = <u_j, H_z u_j>, with H_z u_j a forward-over-reverse product taken
w.r.t. z (not W), vectorized over a chunk of entries.

Block method (one HVP per output position): examples are independent, so the unit
vector of z at position s of channel o in every example gives, per example n, row s
of the S x S block B[n, o] of H_z within channel o. Then
H_W[p, o] = sum_n sum_{s, s'} P[n, s, p] B[n, o, s, s'] P[n, s', p]. It costs S x O
HVPs instead of F x O (F = entries per channel), so each layer takes whichever is
fewer: Dense kernels (S = 1) need one HVP per output unit.

Where every layer after the target passes the second-derivative audit compiled by XLA
too, the chunks are compiled by XLA (about 2x faster on small suffixes, where the
graph executor's per-op cost dominates); a compilation XLA refuses falls back to the graph.
With ``precision="float64"`` every layer computes in float64 from its float32 weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.curvature.autodiff import hvp
from pipeline.curvature.engines import DEFAULT_MEMORY_BUDGET
from pipeline.curvature.patches import block_products, channel_patches, patch_column
from pipeline.curvature.precision import computing_in_float64
from pipeline.curvature.problem import Problem
from pipeline.curvature.suffix import suffix_floats
from pipeline.errors import BadInputError

log = logging.getLogger(__name__)


def entry_curvatures(problem: Problem, x, y, f_ids: tf.Tensor, o_ids: tf.Tensor) -> tf.Tensor:
    """Sum over the batch of H_W[j, j] for the entries j = (feature f_ids[k], z channel o_ids[k])."""
    target = problem.target
    u_in = target.input_stage(x)
    patches = target.patches(u_in)  # (N, S, G, F)
    z = target.pre_activation(u_in)
    channels, per_group = target.z_channels, target.z_channels // target.weight.groups

    def loss_of(delta):
        return problem.loss_sum(x, y, delta)

    def one(ids):
        column = patch_column(patches, ids[1] // per_group, ids[0])  # (N, S)
        u = tf.reshape(column[:, :, None] * tf.one_hot(ids[1], channels, dtype=z.dtype), tf.shape(z))
        hu = target.flat(hvp(loss_of, tf.zeros_like(z), u))
        return tf.reduce_sum(column * tf.gather(hu, ids[1], axis=2))

    return tf.vectorized_map(one, tf.stack([f_ids, o_ids], axis=1))


def position_rows(problem: Problem, x, y, s_ids: tf.Tensor, o_ids: tf.Tensor) -> tf.Tensor:
    """(K, N, S): for direction k, H_z times the unit vector at (position s_ids[k], z channel o_ids[k]) of every
    example, restricted to channel o_ids[k]: row s of each example's block B[n, o]."""
    target = problem.target
    z = target.pre_activation(target.input_stage(x))
    positions, channels = target.positions, target.z_channels

    def loss_of(delta):
        return problem.loss_sum(x, y, delta)

    def one(ids):
        unit = tf.one_hot(ids[0], positions, dtype=z.dtype)[:, None] * tf.one_hot(ids[1], channels, dtype=z.dtype)[None, :]
        u = tf.reshape(tf.broadcast_to(unit, (tf.shape(z)[0], positions, channels)), tf.shape(z))
        hu = target.flat(hvp(loss_of, tf.zeros_like(z), u))
        return tf.gather(hu, ids[1], axis=2)

    return tf.vectorized_map(one, tf.stack([s_ids, o_ids], axis=1))


def chunk_diagonal(problem: Problem, method: str, x, y, inner_ids, o_ids, valid, start, width) -> tf.Tensor:
    """(F, width) float64 contribution of one chunk of HVP directions to the diagonal of z channels start:start + width.

    Entry method: direction k is entry (inner_ids[k], o_ids[k]). Block method: it is position
    inner_ids[k] of channel o_ids[k], contributing sum_n P[n, s, f] sum_s' B[n, o, s, s'] P[n, s', f].
    Directions with ``valid`` 0 pad the chunk to its traced size and add nothing.
    """
    target = problem.target
    if method == "entry":
        values = entry_curvatures(problem, x, y, inner_ids, o_ids)
        values = values * tf.cast(valid, values.dtype)
        where = tf.stack([inner_ids, o_ids - start], axis=1)
        per_entry = tf.tensor_scatter_nd_add(tf.zeros((target.features, width), values.dtype), where, values)
        return tf.cast(per_entry, tf.float64)
    rows = position_rows(problem, x, y, inner_ids, o_ids)  # (K, N, S): row s of B[n, o]
    rows = rows * tf.cast(valid, rows.dtype)[:, None, None]
    patches = channel_patches(target.patches(target.input_stage(x)), target.group_ids(slice(0, target.z_channels)))
    return tf.cast(block_products(patches, inner_ids, o_ids, start, rows, width), tf.float64)


def gradient_if(wanted, problem: Problem, x, y, start, width) -> tuple[tf.Tensor, tf.Tensor]:
    """``problem.batch_gradient`` for z channels start:start + width when ``wanted`` (a boolean tensor), else zeros.

    A graph condition rather than a Python one, so the chunk that takes the gradient and those that
    do not share one traced graph (tracing vectorized HVPs costs seconds).
    """
    features = problem.target.features
    return tf.cond(wanted, lambda: tuple(tf.cast(t, tf.float64) for t in problem.batch_gradient(x, y, slice(start, start + width))),
                   lambda: (tf.zeros((features, width), tf.float64), tf.constant(0.0, tf.float64)))


# Peak memory grew by 2.8 to 6.3 times z's and the suffix's outputs per product direction and example, measured over
# both methods, float32 and float64, graph and XLA (scripts/bench_exact_memory.py, docs/BENCHMARKS.md).
DIRECTION_COPIES = 8


@dataclass(frozen=True)
class ProductMemory:
    """Memory a call of vectorized Hessian-vector products takes, predicted from the sizes of the target's z, its
    patches and the suffix's outputs: per example the forward state (kept for the backward pass) and the patches,
    and per product direction and example ``DIRECTION_COPIES`` copies of z and the suffix's outputs. Tracing and
    compiling are not counted: they do not grow with the examples or directions."""

    state_floats: int
    direction_floats: int
    bytes_per_float: int

    @classmethod
    def of(cls, problem: Problem, precision: str) -> "ProductMemory":
        target = problem.target
        suffix = suffix_floats(target)
        return cls(state_floats=2 * suffix + target.patch_floats(target.z_channels),
                   direction_floats=DIRECTION_COPIES * (target.positions * target.z_channels + suffix),
                   bytes_per_float=8 if precision == "float64" else 4)

    def bytes(self, examples: int, directions: int) -> int:
        """Predicted bytes of one call over ``examples`` examples and ``directions`` product directions."""
        return self.bytes_per_float * examples * (self.state_floats + directions * self.direction_floats)

    def directions_fitting(self, examples: int, budget: int) -> int:
        """The most directions one call over ``examples`` examples may take within ``budget`` bytes (0 if none)."""
        spare = budget // (self.bytes_per_float * examples) - self.state_floats
        return max(0, spare // self.direction_floats)


class ExactEngine:
    """Per-batch exact diagonal, ``chunk_size`` HVP directions vectorized per call, by the entry or block method.

    ``jit_compile``: compile the chunks by XLA (only where the suffix passes the audit that way).
    ``precision``: ``float64`` computes every layer in float64 from its float32 weights (as a graph, not by XLA).
    ``memory_budget``: bytes one call may use; a call takes fewer than ``chunk_size`` directions where its
    ``ProductMemory`` needs that, and ``check_memory`` refuses a batch for which one direction does not fit.
    """

    name = "exact"

    def __init__(self, problem: Problem, chunk_size: int = 128, jit_compile: bool = False, precision: str = "float32",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        self.chunk_size = chunk_size
        self.precision = precision
        self.memory_budget = memory_budget
        self.memory = ProductMemory.of(problem, precision)
        target = problem.target
        self.features = target.features
        self.positions = target.positions
        self.method = "block" if self.positions < self.features else "entry"
        # XLA's float64 convolutions ran 40x slower than the graph's on CPU (EfficientNetB0 stem_conv, 17.3 against 0.42 s
        # per chunk of 32 HVPs, at 3.3x the memory), so float64 runs as a graph
        self.compiler = "xla" if jit_compile and precision != "float64" else "graph"
        self.jit_allowed = jit_compile
        # Traced outside any XLA context, so it holds the very ops the audit verifies; XLA compiles that graph.
        self._graph = tf.function(lambda method, x, y, inner, o, valid, start, width, with_gradient: (
            chunk_diagonal(problem, method, x, y, inner, o, valid, start, width),
            *gradient_if(with_gradient, problem, x, y, start, width)))
        self._compiled = {}

    def _run_chunk(self, method, x, *arguments) -> tuple:
        if self.precision != "float64":
            return self._run_traced(method, x, *arguments)
        x = tf.cast(x, tf.float64) if tf.as_dtype(x.dtype).is_floating else x
        with computing_in_float64(self.problem.target.model):  # traced (and retraced) in float64
            return self._run_traced(method, x, *arguments)

    def _run_traced(self, *arguments) -> tuple:
        if self.compiler == "xla":
            traced = self._graph.get_concrete_function(*arguments)
            if traced not in self._compiled:
                self._compiled[traced] = tf.function(lambda *values: traced(*values), jit_compile=True)
            try:
                return self._compiled[traced](*arguments)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as exc:
                if "XLA" not in str(exc):
                    raise
                log.warning("XLA cannot compile the exact engine's products here; running them as a graph: %s",
                            str(exc).splitlines()[0][:200])
                self.compiler = "graph"
        try:
            return self._graph(*arguments)
        except tf.errors.InvalidArgumentError as exc:  # TensorFlow's CPU kernels lack grouped-convolution gradients
            if "grouped convolutions are not supported" not in str(exc) or not self.jit_allowed:
                raise
            self.compiler = "xla"
            return self._run_traced(*arguments)

    streams_gradient = True  # the gradient comes from the first chunk's call

    def directions_per_call(self, examples: int) -> int:
        """``chunk_size``, or fewer where a call over ``examples`` examples would not fit the memory budget (at least 1)."""
        return max(1, min(self.chunk_size, self.memory.directions_fitting(examples, self.memory_budget)))

    def predicted_bytes(self, examples: int) -> int:
        """Predicted memory of one call over a batch of ``examples`` examples."""
        return self.memory.bytes(examples, self.directions_per_call(examples))

    def check_memory(self, examples: int) -> None:
        """Raise BadInputError when one product direction over a batch of ``examples`` examples does not fit the
        memory budget, saying what would."""
        if self.memory.directions_fitting(examples, self.memory_budget) >= 1:
            return
        needed = self.memory.bytes(examples, 1)
        fits = self.memory_budget // self.memory.bytes(1, 1)
        hint = (f"data.batch_size {fits} would fit" if fits >= 1 else
                f"it needs compute.memory_gb of at least {self.memory.bytes(1, 1) / 2**30:.3g} (with data.batch_size 1)")
        raise BadInputError(f"the exact engine needs {needed / 2**30:.3g} GiB for one Hessian-vector product over a batch"
                            f" of {examples} examples of {self.problem.target.name!r} ({self.precision}), more than"
                            f" compute.memory_gb {self.memory_budget / 2**30:.3g}; {hint}")

    def batch_diagonal(self, x, y, channels: slice) -> np.ndarray:
        """(F, O') sum over the batch of the diagonal for z channels ``channels``."""
        return self.batch_derivatives(x, y, channels)[1]

    def batch_derivatives(self, x, y, channels: slice) -> tuple[np.ndarray, np.ndarray, float]:
        """(F, O') sums over the batch of the gradient and of the diagonal for z channels ``channels``, and the summed loss."""
        outs = channels.stop - channels.start
        inner = self.positions if self.method == "block" else self.features
        total = inner * outs
        size = min(self.directions_per_call(len(x)), total)  # every chunk is padded to this size: one traced graph serves all
        inner_ids = np.tile(np.arange(inner, dtype=np.int32), outs)
        o_ids = np.repeat(np.arange(channels.start, channels.stop, dtype=np.int32), inner)
        for first in range(0, total, size):
            count = min(size, total - first)
            pad = np.zeros(size - count, np.int32)
            arguments = (self.method, x, y, tf.constant(np.concatenate([inner_ids[first : first + count], pad])),
                         tf.constant(np.concatenate([o_ids[first : first + count], pad + channels.start])),
                         tf.constant(np.arange(size) < count, tf.float32), tf.constant(channels.start), tf.constant(outs),
                         tf.constant(first == 0))
            if first == 0:
                diagonal, gradient, loss = (t.numpy() for t in self._run_chunk(*arguments))
            else:
                diagonal = diagonal + self._run_chunk(*arguments)[0].numpy()
        return gradient, diagonal, float(loss)

    def directions(self, channels: slice) -> int:
        """HVPs per example block for z channels ``channels``: the unit of this engine's cost."""
        return (self.positions if self.method == "block" else self.features) * (channels.stop - channels.start)

    def seconds_per_example(self, x, y) -> float:
        """Seconds one example costs over every channel, from one chunk timed after a warm-up one."""
        x, y = x[:1], y[:1]
        self.time_chunk(x, y)  # trace
        return self.time_chunk(x, y) / self.directions_per_call(1) * self.directions(slice(0, self.problem.target.z_channels))

    def time_chunk(self, x, y) -> float:
        """Seconds for one call of ``directions_per_call`` HVP directions on examples ``x``."""
        size = self.directions_per_call(len(x))
        ids = tf.zeros([size], tf.int32)
        started = time.perf_counter()
        self._run_chunk(self.method, x, y, ids, ids, tf.ones([size]), tf.constant(0), tf.constant(1), tf.constant(False))[0].numpy()
        return time.perf_counter() - started


def exact_entries(problem: Problem, batches, indices: list[tuple[int, ...]]) -> np.ndarray:
    """Mean-loss Hessian-diagonal entries at multi-indices of W by the exact engine (a spot check)."""
    positions = [problem.target.weight.flat_position(index) for index in indices]
    features = np.array([f for f, _ in positions], np.int32)
    channels = np.array([o for _, o in positions], np.int32)
    total, examples = np.zeros(len(indices)), 0
    for x, y in batches:
        total += entry_curvatures(problem, tf.constant(x), tf.constant(y), tf.constant(features), tf.constant(channels)).numpy()
        examples += len(x)
    return total / examples
