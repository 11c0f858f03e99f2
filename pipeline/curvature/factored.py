"""Exact Hessian diagonals for piecewise-linear suffixes via loss-Hessian factors, for many targets in one pass.

If every op after a target's z is piecewise linear, H_z = Jᵀ H_loss J with J = d logits / dz, and
H_loss = S Sᵀ per example. Back-propagating the C columns of S to z gives V_c, and

    H_W[f, o] = Σ_{n, c} (Σ_s P[n, s, (o,) f] V_c[n, s, o])²

with P the target's patches. The columns are back-propagated once per example block from the loss
down to the lowest target (``columns.backward``), and each target's stage folds them as they pass
(``folds``), so every kernel and bias on the way shares one pass. A kernel and its bias share their
stage's fold (a bias's patches are ones).

Where the loss has many classes, ones pushed back through |Jᵀ| first find each example's and channel's
support: V_c vanishes at the same positions for every column c (ReLU masks and max-pool routing do not
depend on c), which the Gram and support-product folds exploit, exactly.

Columns stream in chunks: each chunk is folded in and dropped, so an example's C columns are never
held at once; the loss gradient rides as one more column of the last chunk.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from pipeline.curvature.engines import DEFAULT_MEMORY_BUDGET
from pipeline.curvature.columns import backward, site_key, stage_inputs, suffix_forward
from pipeline.curvature.folds import SpareMemory, stage_fold
from pipeline.curvature.graph import suffix_of
from pipeline.curvature.patches import channel_patches, contract
from pipeline.curvature.precision import as_float32, computing_in_float64
from pipeline.curvature.problem import Problem, final_softmax
from pipeline.curvature.target import Target
from pipeline.errors import BadInputError
from pipeline.losses import Loss

SPARSE_MIN_CLASSES = 64


@dataclass(frozen=True)
class StageTargets:
    """The targets that share one stage of one layer (a kernel and its bias), and the z channels computed."""

    key: str
    layer: object
    stage: int
    targets: tuple[Target, ...]
    z_channels: slice

    @property
    def width(self) -> int:
        return self.z_channels.stop - self.z_channels.start

    def columns(self, captured: dict) -> tf.Tensor:
        """This stage's (K, N, S, O') columns of the z channels computed, from ``backward``'s result (not copied
        when every channel is computed)."""
        columns = self.targets[0].flat_columns(captured[self.key])
        return columns if self.width == self.targets[0].z_channels else columns[..., self.z_channels]


def by_stage(targets: Sequence[Target], z_channels: slice | None = None) -> list[StageTargets]:
    """Group targets by their layer's stage, in order."""
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(site_key(target.layer, target.stage_index), []).append(target)
    found = []
    for key, members in groups.items():
        first = members[0]
        channels = z_channels or slice(0, first.z_channels)
        found.append(StageTargets(key, first.layer, first.stage_index, tuple(members), channels))
    return found


class FactoredPass:
    """The factored diagonal and the gradient of every target in ``targets`` (one model), from one shared
    back-propagation of the factor columns per chunk of examples.

    Examples are processed in chunks that fit ``memory_budget`` bytes; columns in chunks of
    ``column_chunk``. ``z_channels`` restricts a single target to a slice of its z channels.

    ``decisions``: ``float64`` computes the forward pass (ReLU masks, max-pool routing, stage inputs,
    the loss, its factor and gradient) in float64 from the float32 weights, cast up exactly, so no
    decision flips near a tie through float32 rounding; the columns then go back in float32.
    ``float32`` computes it in float32.
    """

    def __init__(self, loss: Loss, targets: Sequence[Target], peel_softmax: bool, column_chunk: int = 16,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, factor_fn=None, z_channels: slice | None = None,
                 decisions: str = "float64"):
        model = targets[0].model
        self.model, self.loss, self.targets = model, loss, tuple(targets)
        layers = list({id(t.layer): t.layer for t in targets}.values())
        self.suffix = suffix_of(model, layers, peeled=final_softmax(model) if peel_softmax else None)
        if not self.suffix.piecewise_linear:
            raise ValueError("the factored engine needs a piecewise-linear suffix: " + ", ".join(self.suffix.offending))
        self.decisions = decisions
        self.factor_width = loss.factor_width(int(np.prod(model.outputs[0].shape[1:])))
        self.column_chunk = min(column_chunk, self.factor_width + 1)
        self.memory_budget = memory_budget
        self.stages = by_stage(targets, z_channels)
        self.sparse = self.factor_width >= SPARSE_MIN_CLASSES
        suffix = self.suffix

        def forward(x, y):
            if decisions != "float64":
                return suffix_forward(suffix, model, loss, x, y, peel_softmax, factor_fn)
            with computing_in_float64(model):
                return as_float32(suffix_forward(suffix, model, loss, _in_dtype(x, tf.float64), y, peel_softmax, factor_fn))

        self._forward = tf.function(forward)
        self._backward = tf.function(lambda forward, ids: backward(suffix, forward, ids))
        self._reach = tf.function(lambda forward: backward(suffix, forward, None, magnitude=True))
        self._patches = tf.function(self._stage_patches)
        self._gradient = tf.function(lambda patches, dz: tf.cast(contract(patches, dz), tf.float64))

    @property
    def column_method(self) -> str:
        """``rules``, or which steps are back-propagated by autodiff at their input for want of a dedicated rule."""
        return "rules" + (f" (autodiff at the input of {', '.join(self.suffix.fallbacks)})" if self.suffix.fallbacks else "")

    def _stage_patches(self, forward) -> dict:
        """Each target's channel patches, from the stage inputs the forward pass kept."""
        found = {}
        for stage in self.stages:
            u = stage_inputs(self.suffix, forward, stage.layer)[stage.stage]
            for target in stage.targets:
                found[target.name] = channel_patches(target.patches(u), target.group_ids(stage.z_channels))
        return found

    def _activation_sizes(self) -> list[int]:
        """Entries per example of each suffix step's output."""
        return [math.prod(int(d) for d in step.node.outputs[0].shape[1:]) for step in self.suffix.steps if step.node is not None]

    def _bytes_per_column(self) -> int:
        """Memory one column of one example takes: at every step (the running cotangents) and at every target's z."""
        largest = max(self._activation_sizes(), default=1)
        captured = sum(stage.targets[0].positions * stage.width for stage in self.stages)
        return 4 * (3 * largest + captured)

    def bytes_per_example(self) -> int:
        """Memory one example needs: the forward pass's kept state (more with float64 decisions), a column chunk
        and the patches. What folds keep (Gram matrices, gathered patches) and product calls share what the budget
        leaves (``SpareMemory``): a stage whose kept state would not fit folds its columns by products instead, which
        need no more."""
        activations = sum(self._activation_sizes())
        patches = sum(t.patch_floats(s.width) for s in self.stages for t in s.targets)
        kept = (3 if self.decisions == "float64" else 2) * activations
        return 4 * (kept + patches) + self.column_chunk * self._bytes_per_column()

    def check_memory(self) -> None:
        """Raise BadInputError when one example does not fit the memory budget, saying what would."""
        needed = self.bytes_per_example()
        if needed <= self.memory_budget:
            return
        per_column = self._bytes_per_column()
        fits = (self.memory_budget - (needed - self.column_chunk * per_column)) // per_column
        hint = (f"compute.column_chunk {int(fits)} would fit" if fits >= 1 else
                f"it needs compute.memory_gb of at least {needed / 2**30:.3g}")
        raise BadInputError(f"the factored engine needs {needed / 2**30:.3g} GiB for one example of these {len(self.targets)}"
                            f" tensor(s) with compute.column_chunk {self.column_chunk}, more than compute.memory_gb"
                            f" {self.memory_budget / 2**30:.3g}; {hint}")

    def example_chunk(self) -> int:
        """Examples per forward pass so that kept state, a column chunk at every step and the patches fit."""
        return max(1, self.memory_budget // self.bytes_per_example())

    def predicted_bytes(self, examples: int) -> int:
        """Predicted memory of a batch of ``examples`` examples: its largest example chunk's (what folds keep aside)."""
        return min(examples, self.example_chunk()) * self.bytes_per_example()

    def _folds(self, patches: dict, reach: dict, examples: int) -> dict:
        """Each stage's fold of ``examples`` examples, drawing on the memory the budget leaves beyond them."""
        spare = SpareMemory(max(0, self.memory_budget - examples * self.bytes_per_example()))
        return {stage.key: stage_fold(stage, patches, reach.get(stage.key), examples, spare, self.factor_width,
                                      self.column_chunk)
                for stage in self.stages}

    def _column_chunks(self) -> list[tf.Tensor]:
        """Column ids in chunks of ``column_chunk``: every factor column, then the loss gradient (id K + 1); the
        last chunk is padded with the zero column (id K), which adds nothing."""
        wanted = [*range(self.factor_width), self.factor_width + 1]
        chunks = []
        for c0 in range(0, len(wanted), self.column_chunk):
            chunk = wanted[c0: c0 + self.column_chunk]
            chunks.append(tf.constant(chunk + [self.factor_width] * (self.column_chunk - len(chunk)), tf.int32))
        return chunks

    def seconds_per_example(self, x, y, timed_chunks: int = 2) -> float:
        """Seconds one example costs, from examples ``x``: the forward pass and ``timed_chunks`` column chunks,
        the other chunks extrapolated (a whole pass can take minutes); timed after a warm-up of the same steps,
        which traces every function they call."""
        x, y = tf.constant(x[:1]), tf.constant(y[:1])
        self._sampled_pass_seconds(x, y, timed_chunks)
        return self._sampled_pass_seconds(x, y, timed_chunks)

    def _sampled_pass_seconds(self, x, y, timed_chunks: int) -> float:
        chunks = self._column_chunks()
        started = time.perf_counter()
        forward = self._forward(x, y)
        patches = self._patches(forward)
        reach = self._reach(forward) if self.sparse else {}
        folds = self._folds(patches, reach, 1)
        setup = time.perf_counter() - started
        timed = chunks[:max(1, min(timed_chunks, len(chunks)))]
        started = time.perf_counter()
        for ids in timed:
            captured = self._backward(forward, ids)
            for stage in self.stages:
                folds[stage.key].add(stage.columns(captured))
        per_chunk = (time.perf_counter() - started) / len(timed)
        started = time.perf_counter()
        for fold in folds.values():
            fold.result()
        return setup + per_chunk * len(chunks) + time.perf_counter() - started

    def batch_sums(self, x, y) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
        """({target name: ((F, O') gradient sum, (F, O') diagonal sum)} over the batch, the summed loss)."""
        totals: dict[str, list[np.ndarray]] = {}
        loss = 0.0
        step = self.example_chunk()
        for first in range(0, len(x), step):
            sums, part = self._chunk_sums(x[first: first + step], y[first: first + step])
            loss += part
            for name, values in sums.items():
                totals[name] = values if name not in totals else [a + b for a, b in zip(totals[name], values)]
        return {name: (values[0], values[1]) for name, values in totals.items()}, loss

    def _chunk_sums(self, x, y) -> tuple[dict[str, list[np.ndarray]], float]:
        forward = self._forward(tf.constant(x), tf.constant(y))
        patches = self._patches(forward)
        reach = self._reach(forward) if self.sparse else {}
        folds = self._folds(patches, reach, len(x))
        chunks = self._column_chunks()
        at = self.factor_width % self.column_chunk  # the gradient column's place in the last chunk
        gradients: dict[str, np.ndarray] = {}
        for index, ids in enumerate(chunks):
            captured = self._backward(forward, ids)
            for stage in self.stages:
                columns = stage.columns(captured)
                if index == len(chunks) - 1:
                    for target in stage.targets:
                        gradients[target.name] = self._gradient(patches[target.name], columns[at]).numpy()
                    columns = columns[:at]
                if columns.shape[0]:
                    folds[stage.key].add(columns)
        sums = {}
        for stage in self.stages:
            diagonals = folds[stage.key].result()
            for target in stage.targets:
                sums[target.name] = [gradients[target.name], diagonals[target.name]]
        return sums, float(forward.loss)


def _in_dtype(x: tf.Tensor, dtype) -> tf.Tensor:
    """Floating inputs in ``dtype``; integer ones (tokens) as they are."""
    return tf.cast(x, dtype) if x.dtype.is_floating else x


class FactoredEngine:
    """The factored engine for one target (``Problem``): ``batch_derivatives`` over a slice of its z channels."""

    name = "factored"

    def __init__(self, problem: Problem, peel_softmax: bool, column_chunk: int = 16, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.problem = problem
        self.peel_softmax = peel_softmax
        self.column_chunk_requested = column_chunk
        self.memory_budget = memory_budget
        self.pass_ = FactoredPass(problem.loss, [problem.target], peel_softmax, column_chunk, memory_budget)

    @property
    def column_method(self) -> str:
        return self.pass_.column_method

    @property
    def factor_width(self) -> int:
        return self.pass_.factor_width

    def seconds_per_example(self, x, y) -> float:
        return self.pass_.seconds_per_example(x, y)

    def check_memory(self, examples: int) -> None:
        """The pass chunks a batch's examples to fit; it refuses only where one example cannot."""
        self.pass_.check_memory()

    def predicted_bytes(self, examples: int) -> int:
        return self.pass_.predicted_bytes(examples)

    def batch_derivatives(self, x, y, z_channels: slice) -> tuple[np.ndarray, np.ndarray, float]:
        """(F, O') sums over the batch of the gradient and of the diagonal for z channels ``z_channels``, and the summed loss."""
        sums, loss = self.pass_.batch_sums(x, y)
        gradient, diagonal = sums[self.problem.target.name]
        return gradient[:, z_channels], diagonal[:, z_channels], loss
