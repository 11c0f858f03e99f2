"""A run's inputs, loaded and checked: model, data, loss, target, and its plan.

Every check that can reject a config happens here, before any store is
touched, so bad input writes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import keras
import numpy as np

from pipeline.config import Config
from pipeline.curvature import Derivatives, LayerCurvature, batches_of
from pipeline.data import load_data
from pipeline.errors import BadInputError, NonFiniteLossError
from pipeline.model import build_model, load_keras_file, model_fingerprint
from pipeline.plan import Plan, Shard, plan_shards


def load_model(config: Config) -> keras.Model:
    if config.model.source == "keras_file":
        return load_keras_file(config.model.path, config.model.custom_objects)
    return build_model(config.model.builder, seed=config.model.seed, weights=config.model.weights)


@dataclass
class Job:
    """Everything a coordinator or worker needs to compute shards of one config."""

    config: Config
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
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
        x, y = load_data(config.data, tuple(model.inputs[0].shape[1:]), classes, curvature.loss)
        if len(x) == 0:
            raise BadInputError("the data set is empty")
        curvature.check_data(x, y)
        return cls(config=config, model=model, x=x, y=y, curvature=curvature)

    @property
    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return batches_of(self.x, self.y, self.config.data.batch_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.curvature.target.shape

    def plan(self) -> Plan:
        return plan_shards(self.weight_shape, self.config.compute.shard_size)

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Hash of the architecture and all weights; computed once (it reads every weight)."""
        return model_fingerprint(self.model)

    def mean_loss(self) -> float:
        """L over the whole data set; raises when it is not finite."""
        total = 0.0
        for bx, by in self.batches:
            total += float(np.sum(self.curvature.loss.per_example(self.model(bx, training=False), by)))
        value = total / len(self.x)
        if not np.isfinite(value):
            raise NonFiniteLossError(f"the mean loss over {len(self.x)} examples is {value}; nothing was computed")
        return value

    def compute(self, shard: Shard) -> Derivatives:
        return self.curvature.compute(self.batches, shard.channels)

    def describe(self) -> dict:
        """Facts about the inputs, recorded in the store."""
        target = self.curvature.target
        return {
            "model": self.model.name,
            "target_layer": target.layer.name,
            "target_weight": self.config.target.weight,
            "weight_shape": list(self.weight_shape),
            "examples": len(self.x),
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
        """Which second-order rules the engine evaluates through, and which layers were audited at load."""
        check = self.curvature.second_order
        return {} if check is None else {"second_order_rules": list(check.rules), "audited_layers": list(check.audited)}

    def _estimator_facts(self) -> dict:
        """Sample count of a stochastic engine; each shard's manifest entry adds its largest standard error."""
        name = self.curvature.choice.name
        if name == "hutchinson":
            return {"estimator": name, "estimator_samples": self.config.compute.probes}
        if name == "monte_carlo":
            return {"estimator": name, "estimator_samples": self.config.compute.samples}
        return {}
