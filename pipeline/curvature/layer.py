"""Gradient and Hessian diagonal of a model's mean loss w.r.t. one weight tensor.

One shared driver: it walks the batches in order, sums per-batch results in float64, and divides
by the number of examples. Engines differ only in how they produce one batch's sums (the
stochastic ones, which need all data at once, in how they produce the whole data's).
"""

from __future__ import annotations

import collections
import time
import weakref
from typing import Iterable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.engines import DEFAULT_MEMORY_BUDGET, ENGINE_NAMES, EngineChoice, build_engine, choose_engine
from pipeline.curvature.problem import Problem
from pipeline.curvature.second_order import check_second_order, rule_layers
from pipeline.curvature.suffix import check_suffix
from pipeline.curvature.target import Target, channel_slice, resolve_target
from pipeline.errors import BadInputError, NonFiniteLossError
from pipeline.losses import Loss, check_labels, get_loss

ENGINES = ENGINE_NAMES


class Derivatives(NamedTuple):
    """dL/dW and diag d²L/dW², shaped like the weight (or its channel slice)."""

    gradient: np.ndarray
    hessian_diagonal: np.ndarray


def batches_of(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive batches; their order fixes the reduction order."""
    if batch_size < 1:
        raise BadInputError(f"batch_size must be positive, got {batch_size}")
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def check_loss_value(total: float, examples: int) -> None:
    if not np.isfinite(total):
        raise NonFiniteLossError(f"the loss is {total} on a batch of {examples} examples; check the inputs, labels and weights")


def float64_sum(parts: Iterable) -> np.ndarray | None:
    """The float64 sum of ``parts`` in order (None parts skipped)."""
    total = None
    for part in parts:
        if part is None:
            continue
        value = np.asarray(part, dtype=np.float64)
        total = value if total is None else total + value
    return total


def check_data(model: keras.Model, loss: Loss, x: np.ndarray, y: np.ndarray) -> None:
    """Raise BadInputError when inputs or labels do not fit the model."""
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(np.shape(x)[1:]) != expected:
        raise BadInputError(f"inputs have shape {np.shape(x)[1:]} per example; model {model.name!r} expects {expected}")
    check_labels(loss, y, tuple(model.outputs[0].shape), len(x))


class TensorCurvature:
    """One tensor's engine, chosen and checked, with its traced functions: reusable across channel slices and
    example blocks for the lifetime of a worker."""

    def __init__(self, target: Target, loss: Loss, *, engine: str = "exact", chunk_size: int = 128, column_chunk: int = 16,
                 probes: int = 64, samples: int = 16, seed: int = 0, precision: str = "float32",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.target, self.loss = target, loss
        check = check_suffix(target, loss)
        self.suffix_check = check
        self.choice: EngineChoice = choose_engine(engine, check.piecewise_linear, check.reason)
        # Engines that take Hessian-vector products need verified second derivatives after the target.
        self.second_order = check_second_order(target) if self.choice.engine.needs_audit else None
        self.problem = Problem(target, loss, rule_layers(target))
        self.engine = build_engine(self.choice, self.problem, check.peel_softmax,
                                   jit_compile=bool(self.second_order and self.second_order.xla), chunk_size=chunk_size,
                                   column_chunk=column_chunk, probes=probes, samples=samples, seed=seed, precision=precision,
                                   memory_budget=memory_budget)
        problem = self.problem
        self._gradient = tf.function(lambda x, y, start, stop: problem.batch_gradient(x, y, slice(start, stop)))
        self.stderr: np.ndarray | None = None

    def compute_sums(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], channels: slice | None = None) -> Derivatives:
        """float64 sums over the examples of ``batches`` (per batch, then batches in order) for shard-axis ``channels``,
        shaped like the weight restricted to them.

        Partial sums of example blocks fold into the sums over all data; dividing by the number of
        examples gives the derivatives of the mean loss.
        """
        channels = channel_slice(self.target, channels)
        z_channels = self.target.weight.z_channels(channels)
        if self.choice.engine.whole_data:
            grad, diag = self._whole_data_sums(batches, z_channels, channels)
        else:
            grad, diag = self._batch_sums(batches, z_channels)
        if not np.all(np.isfinite(diag)):
            raise NonFiniteLossError(f"the Hessian diagonal of {self.target.name!r} is not finite")
        weight = self.target.weight
        return Derivatives(weight.to_weight(grad, channels), weight.to_weight(diag, channels))

    def check_memory(self, batch_size: int) -> None:
        """Raise BadInputError when the engine bounds its memory and one call over ``batch_size`` examples cannot fit."""
        check = getattr(self.engine, "check_memory", None)
        if check is not None:
            check(batch_size)

    def predicted_bytes(self, batch_size: int) -> int | None:
        """The engine's predicted memory for one call over ``batch_size`` examples, where it predicts one."""
        predict = getattr(self.engine, "predicted_bytes", None)
        return None if predict is None else predict(batch_size)

    def seconds_per_example(self, x, y) -> float:
        """Seconds one example costs over every channel: the engine's own estimate where it has one, else one
        example timed after a warm-up."""
        estimate = getattr(self.engine, "seconds_per_example", None)
        if estimate is not None:
            return estimate(x, y)
        self.compute_sums([(x[:1], y[:1])])
        started = time.perf_counter()
        self.compute_sums([(x[:1], y[:1])])
        return time.perf_counter() - started

    def _batch_sums(self, batches, z_channels: slice) -> tuple[np.ndarray, np.ndarray]:
        grad = diag = None
        for x, y in batches:
            batch_grad, batch_diag, total = self.engine.batch_derivatives(x, y, z_channels)
            check_loss_value(total, len(x))
            grad, diag = float64_sum([grad, batch_grad]), float64_sum([diag, batch_diag])
        return grad, diag

    def _whole_data_sums(self, batches, z_channels: slice, channels: slice) -> tuple[np.ndarray, np.ndarray]:
        grad = float64_sum(self._batch_gradient(x, y, z_channels) for x, y in batches)
        diag, stderr = self.engine.diagonal_sum(batches, z_channels)
        self.stderr = self.target.weight.to_weight(stderr, channels)
        return grad, diag

    def _batch_gradient(self, x, y, z_channels: slice) -> tf.Tensor:
        grad, total = self._gradient(x, y, tf.constant(z_channels.start), tf.constant(z_channels.stop))
        check_loss_value(float(total), len(x))
        return grad


class LayerCurvature(TensorCurvature):
    """``TensorCurvature`` of ``layer``'s ``weight`` in ``model``, by layer path and weight name."""

    def __init__(self, model: keras.Model, layer: str, *, loss: str, from_logits: bool = False, weight: str = "kernel",
                 **options):
        super().__init__(resolve_target(model, layer, weight), get_loss(loss, from_logits), **options)

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        check_data(self.target.model, self.loss, x, y)

    def compute(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], out_channels: slice | None = None) -> Derivatives:
        """Derivatives of the mean loss over all ``batches`` for shard-axis channels ``out_channels``."""
        examples = sum(len(x) for x, _ in batches)
        if examples == 0:
            raise BadInputError("the data set is empty")
        sums = self.compute_sums(batches, out_channels)
        if self.stderr is not None:
            self.stderr = self.stderr / examples
        return Derivatives(sums.gradient / examples, sums.hessian_diagonal / examples)


_CURVATURES: "collections.OrderedDict[tuple, tuple[weakref.ref, LayerCurvature]]" = collections.OrderedDict()
CACHED_CURVATURES = 8


def cached_curvature(model: keras.Model, layer: str, **options) -> LayerCurvature:
    """The LayerCurvature (with its traced functions) of a recent call for the same model, layer and options.

    A repeated ``layer_derivatives`` call then costs its compute, not new tracing. The few most
    recent are kept; the model's weights are read when computing, so updated weights are seen.
    """
    key = (id(model), layer, tuple(sorted(options.items())))
    found = _CURVATURES.get(key)
    if found is not None and found[0]() is model:
        _CURVATURES.move_to_end(key)
        return found[1]
    curvature = LayerCurvature(model, layer, **options)
    _CURVATURES[key] = (weakref.ref(model), curvature)
    while len(_CURVATURES) > CACHED_CURVATURES:
        _CURVATURES.popitem(last=False)
    return curvature


def layer_derivatives(
    model: keras.Model,
    layer: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    loss: str,
    from_logits: bool = False,
    weight: str = "kernel",
    out_channels: slice | None = None,
    engine: str = "exact",
    batch_size: int = 32,
    **engine_options,
) -> Derivatives:
    """Gradient and Hessian diagonal of the mean per-example loss w.r.t. ``layer``'s ``weight``.

    ``layer`` is a layer name or a nested path (``stem/stem_conv``, ``mha/query``); ``weight`` one of
    its target weights (``kernel``, ``bias``, ``depthwise_kernel``, ``gamma``, ...). The model runs in
    inference mode. ``engine`` is ``exact`` (any differentiable suffix), ``factored`` (exact,
    piecewise-linear suffixes only; refused otherwise), ``auto`` (factored where exact, else exact),
    ``hutchinson`` or ``monte_carlo`` (stochastic estimates). Results are float64 NumPy arrays shaped
    like the weight, or like its slice of ``out_channels`` along its shard axis.
    """
    curvature = cached_curvature(model, layer, loss=loss, from_logits=from_logits, weight=weight, engine=engine, **engine_options)
    curvature.check_data(x, y)
    return curvature.compute(batches_of(np.asarray(x), np.asarray(y), batch_size), out_channels)
