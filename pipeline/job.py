"""A run's inputs, loaded and checked: model, data source, loss, target, and its plan.

Every check that can reject a config happens here, before any store is
touched, so bad input writes nothing. The data stay in their source: a unit
reads only its example block, and passes over all data stream block by block.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterator

import keras
import numpy as np

from pipeline.config import Config
from pipeline.curvature import Derivatives, LayerCurvature, batches_of
from pipeline.data import DataSource, open_data
from pipeline.errors import BadInputError, NonFiniteLossError
from pipeline.model import build_model, load_keras_file, model_fingerprint
from pipeline.plan import Plan, Unit, plan_shards


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
    curvature: LayerCurvature

    @classmethod
    def load(cls, config: Config) -> "Job":
        model = load_model(config)
        c = config.compute
        curvature = LayerCurvature(
            model,
            config.target.layer,
            loss=config.loss.name,
            from_logits=config.loss.from_logits,
            weight=config.target.weight,
            engine=c.engine,
            chunk_size=c.chunk_size,
            column_chunk=c.column_chunk,
            probes=c.probes,
            samples=c.samples,
            seed=c.seed,
        )
        classes = int(np.prod(model.outputs[0].shape[1:]))
        options = config.storage_options if config.data.storage_options is None else config.data.storage_options
        source = open_data(config.data, tuple(model.inputs[0].shape[1:]), classes, curvature.loss, options)
        if source.examples == 0:
            raise BadInputError("the data set is empty")
        return cls(config=config, model=model, source=source, curvature=curvature)

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

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.curvature.target.shape

    @property
    def splits_channels(self) -> bool:
        """Only the exact engine's cost grows with the channel width; the others pay per example once for all channels."""
        return self.curvature.choice.name == "exact"

    def plan(self, example_block: int) -> Plan:
        """Units for ``example_block`` examples each; stochastic estimators keep all data in one block (their
        standard errors need every probe's whole-data estimate)."""
        block = example_block if self.curvature.choice.exact else self.examples
        return plan_shards(self.weight_shape, self.config.compute.shard_size, self.examples, block, self.splits_channels)

    def calibrate(self) -> dict:
        """Seconds per example of one unit of the first channel group, timed on one example after a warm-up."""
        group = self.plan(1).groups[0]
        x, y = self.read(0, 1)
        channels = slice(*group)
        engine = self.curvature.engine
        if self.curvature.choice.name == "exact":
            engine.time_chunk(x, y)  # trace
            seconds = engine.time_chunk(x, y) / engine.chunk_size * engine.directions(channels)
        else:
            self.curvature.compute_sums([(x, y)], channels)  # trace
            started = time.perf_counter()
            self.curvature.compute_sums([(x, y)], channels)
            seconds = time.perf_counter() - started
        return {"seconds_per_example": seconds, "examples_timed": 1, "group_channels": group[1] - group[0],
                "engine": self.curvature.choice.name}

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Hash of the architecture and all weights; computed once (it reads every weight)."""
        return model_fingerprint(self.model)

    def mean_loss(self) -> float:
        """L over the whole data set, streamed; raises when it is not finite. Reads (and so checks) every example."""
        total = 0.0
        for bx, by in self.iter_batches():
            total += float(np.sum(self.curvature.loss.per_example(self.model(bx, training=False), by)))
        value = total / self.examples
        if not np.isfinite(value):
            raise NonFiniteLossError(f"the mean loss over {self.examples} examples is {value}; nothing was computed")
        return value

    def compute_unit(self, unit: Unit) -> Derivatives:
        """float64 sums of the unit's examples for its channels."""
        x, y = self.read(unit.first, unit.last)
        return self.curvature.compute_sums(batches_of(x, y, self.config.data.batch_size), unit.channels)

    def describe(self) -> dict:
        """Facts about the inputs, recorded in the store."""
        target = self.curvature.target
        return {
            "model": self.model.name,
            "target_layer": target.layer.name,
            "target_weight": self.config.target.weight,
            "weight_shape": list(self.weight_shape),
            "examples": self.examples,
            "batch_size": self.config.data.batch_size,
            "loss_name": self.config.loss.name,
            "engine_requested": self.config.compute.engine,
            "engine": self.curvature.choice.name,
            "engine_reason": self.curvature.choice.reason,
            "exact": self.curvature.choice.exact,
            **self._second_order_facts(),
            **self._estimator_facts(),
        }

    def _second_order_facts(self) -> dict:
        """Which second-order rules the engine evaluates through, which layers were audited at load, and
        whether the exact engine's products are compiled by XLA (else which layers keep them a graph)."""
        check = self.curvature.second_order
        if check is None:
            return {}
        facts = {"second_order_rules": list(check.rules), "audited_layers": list(check.audited)}
        compiler = getattr(self.curvature.engine, "compiler", None)
        if compiler is not None:
            facts["hvp_compiler"] = compiler
            facts["not_xla_verified"] = list(check.not_xla_verified)
        return facts

    def _estimator_facts(self) -> dict:
        """Sample count of a stochastic engine; each shard's manifest entry adds its largest standard error."""
        name = self.curvature.choice.name
        if name == "hutchinson":
            return {"estimator": name, "estimator_samples": self.config.compute.probes}
        if name == "monte_carlo":
            return {"estimator": name, "estimator_samples": self.config.compute.samples}
        return {}
