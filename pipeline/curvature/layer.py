"""Gradient and Hessian diagonal of a model's mean loss w.r.t. one layer's weight.

One shared driver: it walks the batches in order, sums per-batch results in
float64, and divides by the number of examples. Engines differ only in how
they produce one batch's sum of Hessian-diagonal entries.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature.exact import ExactEngine
from pipeline.curvature.factored import FactoredEngine
from pipeline.curvature.problem import Problem
from pipeline.curvature.stochastic import HutchinsonEngine, MonteCarloFactorEngine
from pipeline.curvature.second_order import check_second_order, rule_layers
from pipeline.curvature.suffix import SuffixCheck, check_suffix
from pipeline.curvature.target import as_kernel, channel_slice, resolve_target
from pipeline.errors import BadInputError, NonFiniteLossError
from pipeline.losses import check_labels, get_loss

ENGINES = ("auto", "exact", "factored", "hutchinson", "monte_carlo")
SECOND_ORDER_ENGINES = ("exact", "hutchinson")


class Derivatives(NamedTuple):
    """dL/dW and diag d²L/dW², shaped like the weight (or its channel slice)."""

    gradient: np.ndarray
    hessian_diagonal: np.ndarray


@dataclass(frozen=True)
class EngineChoice:
    """The engine that will run, and why."""

    name: str
    reason: str
    exact: bool


def choose_engine(requested: str, check: SuffixCheck) -> EngineChoice:
    """Resolve ``auto`` and refuse ``factored`` where it would not be exact, given the suffix ``check``."""
    if requested not in ENGINES:
        raise BadInputError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINES)}")
    if requested == "factored" and not check.piecewise_linear:
        raise BadInputError(f"engine 'factored' would not be exact: {check.reason}; use 'exact' or 'auto'")
    if requested == "monte_carlo":
        if not check.piecewise_linear:
            raise BadInputError(f"engine 'monte_carlo' needs a piecewise-linear suffix: {check.reason}; use 'hutchinson'")
        return EngineChoice("monte_carlo", "requested: Monte-Carlo sampled loss-Hessian factors, not exact", exact=False)
    if requested == "auto":
        name = "factored" if check.piecewise_linear else "exact"
        return EngineChoice(name, f"auto: {check.reason}", exact=True)
    if requested == "hutchinson":
        return EngineChoice("hutchinson", "requested: stochastic estimate, not exact", exact=False)
    return EngineChoice(requested, f"requested: {check.reason}", exact=True)


def batches_of(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive batches; their order fixes the reduction order."""
    if batch_size < 1:
        raise BadInputError(f"batch_size must be positive, got {batch_size}")
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class LayerCurvature:
    """Compiled per-layer derivatives of one model, reusable across channel shards.

    Holds the traced TensorFlow functions for the lifetime of a worker, so each
    shard pays only for its own computation.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str,
        *,
        loss: str,
        from_logits: bool = False,
        weight: str = "kernel",
        engine: str = "exact",
        chunk_size: int = 128,
        column_chunk: int = 16,
        probes: int = 64,
        samples: int = 16,
        seed: int = 0,
    ):
        self.target = resolve_target(model, layer, weight)
        self.loss = get_loss(loss, from_logits)
        check = check_suffix(self.target, self.loss)
        self.choice = choose_engine(engine, check)
        # Engines that take Hessian-vector products need verified second derivatives after the target.
        self.second_order = check_second_order(self.target) if self.choice.name in SECOND_ORDER_ENGINES else None
        self.problem = Problem(self.target, self.loss, rule_layers(self.target))
        if self.choice.name == "exact":
            self.engine = ExactEngine(self.problem, chunk_size, jit_compile=self.second_order.xla)
        elif self.choice.name == "factored":
            self.engine = FactoredEngine(self.problem, check.peel_softmax, column_chunk)
        elif self.choice.name == "monte_carlo":
            self.engine = MonteCarloFactorEngine(self.problem, check.peel_softmax, samples=samples, seed=seed)
        else:
            self.engine = HutchinsonEngine(self.problem, probes=probes, seed=seed)
        self._gradient = tf.function(lambda x, y, start, stop: self.problem.batch_gradient(x, y, slice(start, stop)))
        self.stderr: np.ndarray | None = None

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        model = self.target.model
        expected = tuple(model.inputs[0].shape[1:])
        if tuple(np.shape(x)[1:]) != expected:
            raise BadInputError(f"inputs have shape {np.shape(x)[1:]} per example; model {model.name!r} expects {expected}")
        check_labels(self.loss, y, tuple(model.outputs[0].shape), len(x))

    def compute(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], out_channels: slice | None = None) -> Derivatives:
        """Derivatives of the mean loss over all ``batches`` for ``out_channels``."""
        examples = sum(len(x) for x, _ in batches)
        if examples == 0:
            raise BadInputError("the data set is empty")
        sums = self.compute_sums(batches, out_channels)
        if self.stderr is not None:
            self.stderr = self.stderr / examples
        return Derivatives(sums.gradient / examples, sums.hessian_diagonal / examples)

    def compute_sums(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], out_channels: slice | None = None) -> Derivatives:
        """float64 sums over the examples of ``batches`` (per batch, then batches in order) for ``out_channels``.

        Partial sums of example blocks fold into the sums over all data; dividing by the number of
        examples gives the derivatives of the mean loss.
        """
        channels = channel_slice(self.target, out_channels)
        if getattr(self.engine, "streams_gradient", False):
            grad, diag = self._streamed_sums(batches, channels)
        else:
            grad, diag = self._separate_sums(batches, channels)
        if not np.all(np.isfinite(diag)):
            raise NonFiniteLossError(f"the Hessian diagonal of layer {self.target.layer.name!r} is not finite")
        return Derivatives(as_kernel(grad, self.target, channels), as_kernel(diag, self.target, channels))

    def _streamed_sums(self, batches, channels: slice) -> tuple[np.ndarray, np.ndarray]:
        grad = diag = None
        for x, y in batches:
            batch_grad, batch_diag, total = self.engine.batch_derivatives(x, y, channels)
            self._check_loss(total, len(x))
            grad, diag = self._sum([grad, batch_grad]), self._sum([diag, batch_diag])
        return grad, diag

    def _separate_sums(self, batches, channels: slice) -> tuple[np.ndarray, np.ndarray]:
        grad = self._sum(self._batch_gradient(x, y, channels) for x, y in batches)
        if not self.choice.exact:
            diag, stderr = self.engine.diagonal_sum(batches, channels)
            self.stderr = as_kernel(stderr, self.target, channels)
        else:
            diag = self._sum(self.engine.batch_diagonal(x, y, channels) for x, y in batches)
        return grad, diag

    def _batch_gradient(self, x, y, channels: slice) -> tf.Tensor:
        grad, total = self._gradient(x, y, tf.constant(channels.start), tf.constant(channels.stop))
        self._check_loss(float(total), len(x))
        return grad

    @staticmethod
    def _check_loss(total: float, examples: int) -> None:
        if not np.isfinite(total):
            raise NonFiniteLossError(f"the loss is {total} on a batch of {examples} examples; check the inputs, labels and weights")

    @staticmethod
    def _sum(parts: Iterable[tf.Tensor | None]) -> np.ndarray:
        total = None
        for part in parts:
            if part is None:
                continue
            value = np.asarray(part, dtype=np.float64)
            total = value if total is None else total + value
        return total


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
    """Gradient and Hessian diagonal of the mean per-example loss w.r.t. ``layer``'s weight.

    The model runs in inference mode. ``engine`` is ``exact`` (any differentiable
    suffix), ``factored`` (exact, piecewise-linear suffixes only; refused
    otherwise), ``auto`` (factored where exact, else exact) or ``hutchinson``
    (a stochastic estimate). Results are float64 NumPy arrays shaped like the
    weight, or like its slice ``[..., out_channels]``.
    """
    curvature = cached_curvature(model, layer, loss=loss, from_logits=from_logits, weight=weight, engine=engine, **engine_options)
    curvature.check_data(x, y)
    return curvature.compute(batches_of(np.asarray(x), np.asarray(y), batch_size), out_channels)
