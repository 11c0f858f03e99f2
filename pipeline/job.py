"""A run's inputs, loaded and checked: model, data source, loss, targets and their engines, and the plan.

Every check that can reject a config happens here, before any store is touched, so bad input writes
nothing. The data stay in their source: a unit reads only its example block, and passes over all
data stream block by block.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterator

import keras
import numpy as np

from pipeline.config import Config
from pipeline.curvature import batches_of
from pipeline.curvature.network import NetworkCurvature
from pipeline.curvature.target import Target, resolve_targets
from pipeline.data import DataSource, open_data
from pipeline.errors import BadInputError, NonFiniteLossError
from pipeline.losses import get_loss
from pipeline.model import build_model, load_keras_file, model_fingerprint
from pipeline.plan import Plan, TensorPlan, Unit, plan_units
from pipeline.reduction import sum_name


def load_model(config: Config) -> keras.Model:
    if config.model.source == "keras_file":
        return load_keras_file(config.model.path, config.model.custom_objects)
    return build_model(config.model.builder, seed=config.model.seed, weights=config.model.weights)


STREAM_BATCHES = 16  # batches read from the source at a time when streaming over all data


@dataclass
class Job:
    """Everything a coordinator or worker needs to compute units of one config."""

    config: Config
    model: keras.Model
    source: DataSource
    targets: tuple[Target, ...]
    curvature: NetworkCurvature

    @classmethod
    def load(cls, config: Config) -> "Job":
        model = load_model(config)
        c = config.compute
        loss = get_loss(config.loss.name, config.loss.from_logits)
        targets = tuple(resolve_targets(model, config.target_specs()))
        curvature = NetworkCurvature(model, targets, loss, engine=c.engine, memory_budget=int(c.memory_gb * 2**30),
                                     chunk_size=c.chunk_size, precision=c.precision,
                                     column_chunk=c.column_chunk, probes=c.probes, samples=c.samples, seed=c.seed)
        classes = int(np.prod(model.outputs[0].shape[1:]))
        options = config.storage_options if config.data.storage_options is None else config.data.storage_options
        source = open_data(config.data, tuple(model.inputs[0].shape[1:]), classes, loss, options)
        if source.examples == 0:
            raise BadInputError("the data set is empty")
        curvature.check_memory(min(config.data.batch_size, source.examples))
        return cls(config=config, model=model, source=source, targets=targets, curvature=curvature)

    @property
    def loss(self):
        return self.curvature.loss

    @property
    def examples(self) -> int:
        return self.source.examples

    def read(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``first:last``, checked against the model (shapes, labels)."""
        x, y = self.source.read(first, last)
        self.curvature.check_data(x, y)
        return x, y

    def iter_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All batches in order, read from the source a few batches at a time."""
        size = self.config.data.batch_size
        for first in range(0, self.examples, size * STREAM_BATCHES):
            yield from batches_of(*self.read(first, first + size * STREAM_BATCHES), size)

    def tensor_plans(self) -> tuple[TensorPlan, ...]:
        found = []
        for target in self.targets:
            engine = self.curvature.engine_of(target.name)
            weight = target.weight
            found.append(TensorPlan(target.name, weight.shape, weight.shard_axis, weight.dims, engine.shares_pass,
                                    engine.splits_channels, engine.whole_data))
        return tuple(found)

    def plan(self, example_block: int) -> Plan:
        """Units of ``example_block`` examples each (engines that need the whole data keep it in one block)."""
        return plan_units(self.tensor_plans(), self.config.compute.shard_size, self.examples, example_block)

    def calibrate(self) -> dict:
        """Seconds per example of the shared pass and of each separate tensor over all its channels, timed on one
        example after a warm-up; and each one's tracing seconds: what its calibration took beyond that, the cost
        (tracing and compiling its functions) that every worker pays once before its first unit of that work."""
        x, y = self.read(0, 1)
        engines = {"shared": self.curvature.shared} if self.curvature.shared is not None else {}
        seconds, tracing = {}, {}
        for name, engine in {**engines, **self.curvature.separate}.items():
            started = time.perf_counter()
            seconds[name] = engine.seconds_per_example(x, y)
            tracing[name] = max(0.0, time.perf_counter() - started - seconds[name])
        return {"seconds_per_example": seconds, "tracing_seconds": tracing, "examples_timed": 1}

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Hash of the architecture and all weights; computed once (it reads every weight)."""
        return model_fingerprint(self.model)

    def mean_loss(self) -> float:
        """L over the whole data set, streamed; raises when it is not finite. Reads (and so checks) every example."""
        total = 0.0
        for bx, by in self.iter_batches():
            total += float(np.sum(self.loss.per_example(self.model(bx, training=False), by)))
        value = total / self.examples
        if not np.isfinite(value):
            raise NonFiniteLossError(f"the mean loss over {self.examples} examples is {value}; nothing was computed")
        return value

    def compute_unit(self, unit: Unit) -> dict[str, np.ndarray]:
        """float64 sums of the unit's examples: each of its tensors' gradient and diagonal (its channels)."""
        x, y = self.read(unit.first, unit.last)
        batches = batches_of(x, y, self.config.data.batch_size)
        if unit.tensor is None:
            sums = self.curvature.shared_sums(batches)
            found = {}
            for index, target in enumerate(self.targets):
                if target.name in sums:
                    found[sum_name(index, "gradient")] = sums[target.name].gradient
                    found[sum_name(index, "hessian_diagonal")] = sums[target.name].hessian_diagonal
            return found
        target = self.targets[unit.tensor]
        sums = self.curvature.tensor_sums(target.name, batches, unit.channels)
        return {sum_name(unit.tensor, "gradient"): sums.gradient, sum_name(unit.tensor, "hessian_diagonal"): sums.hessian_diagonal}

    def weight_values(self, tensor: int) -> np.ndarray:
        """The model's values of tensor ``tensor``, in float64."""
        return np.asarray(self.targets[tensor].variable.numpy(), np.float64)

    def describe(self) -> dict:
        """Facts about the inputs, recorded in the store's root attributes."""
        return {
            "model": self.model.name,
            "examples": self.examples,
            "batch_size": self.config.data.batch_size,
            "loss_name": self.config.loss.name,
            "engine_requested": self.config.compute.engine,
            "column_method": self.curvature.shared.column_method if self.curvature.shared is not None else None,
        }

    def tensor_facts(self, name: str) -> dict:
        """Facts about one tensor, recorded in its group: its layer, engine and why, and what that engine relied on."""
        target = {t.name: t for t in self.targets}[name]
        choice = self.curvature.choices[name]
        facts = {"layer": target.path, "weight": target.weight.name, "layer_type": type(target.layer).__name__,
                 "shape": list(target.shape), "shard_axis": target.weight.shard_axis, "entries": target.weight.entries,
                 "engine": choice.name, "engine_reason": choice.reason, "exact": choice.exact}
        separate = self.curvature.separate.get(name)
        if separate is None:
            return facts
        check = separate.second_order
        if check is not None:
            facts.update(second_order_rules=list(check.rules), audited_layers=list(check.audited))
            compiler = getattr(separate.engine, "compiler", None)
            if compiler is not None:
                facts.update(hvp_compiler=compiler, not_xla_verified=list(check.not_xla_verified))
        if choice.engine.samples_option:
            facts.update(estimator=choice.name, estimator_samples=getattr(self.config.compute, choice.engine.samples_option))
        return facts
