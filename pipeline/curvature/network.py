"""Many tensors of one model at once: each gets its engine, and the factored ones share one pass.

Per tensor, ``auto`` takes the factored engine where that tensor's suffix is piecewise linear and
the exact one elsewhere; every tensor whose engine ``shares_pass`` is computed by one
``FactoredPass`` per example block (the columns go down once, past every such tensor), the others
each by their own engine, over channel groups.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from pipeline.curvature.engines import DEFAULT_MEMORY_BUDGET, EngineChoice, choose_engine
from pipeline.curvature.factored import FactoredPass
from pipeline.curvature.layer import Derivatives, TensorCurvature, check_data, check_loss_value, float64_sum
from pipeline.curvature.suffix import check_suffix, peeled_softmax
from pipeline.curvature.target import Target, channel_slice
from pipeline.errors import NonFiniteLossError
from pipeline.losses import Loss


class NetworkCurvature:
    """The engines of ``targets`` (tensors of one model) for ``loss``, chosen and checked once.

    ``options``: the engines' settings (``chunk_size``, ``column_chunk``, ``probes``, ``samples``, ``seed``);
    ``memory_budget``: bytes the shared pass, and each separate engine's call, may use (the shared pass refuses, before
    any compute, a plan that cannot fit; ``check_memory`` asks the separate engines for a batch size).
    """

    def __init__(self, model: keras.Model, targets: Sequence[Target], loss: Loss, *, engine: str = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, **options):
        self.model, self.loss = model, loss
        self.targets = {t.name: t for t in targets}
        self.choices: dict[str, EngineChoice] = {}
        self.checks = {}
        for target in targets:
            check = self.checks[target.name] = check_suffix(target, loss)
            self.choices[target.name] = choose_engine(engine, check.piecewise_linear, check.reason)
        shared = [t for t in targets if self.choices[t.name].engine.shares_pass]
        self.shared_names = tuple(t.name for t in shared)
        self.shared = None
        if shared:
            self.shared = FactoredPass(loss, shared, peeled_softmax(model, loss) is not None,
                                       options.get("column_chunk", 16), memory_budget)
            self.shared.check_memory()
        self.separate = {t.name: TensorCurvature(t, loss, engine=self.choices[t.name].name, memory_budget=memory_budget,
                                                 **options)
                         for t in targets if t.name not in self.shared_names}

    def check_memory(self, batch_size: int) -> None:
        """Raise BadInputError when a separate tensor's engine cannot fit one call over ``batch_size`` examples."""
        for separate in self.separate.values():
            separate.check_memory(batch_size)

    def engine_of(self, name: str):
        """The ``Engine`` flags of tensor ``name``."""
        return self.choices[name].engine

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        check_data(self.model, self.loss, x, y)

    def shared_sums(self, batches) -> dict[str, Derivatives]:
        """float64 sums over ``batches`` (per batch, then batches in order) of every shared tensor, W-shaped."""
        totals: dict[str, list] = {name: [None, None] for name in self.shared_names}
        for x, y in batches:
            sums, loss = self.shared.batch_sums(x, y)
            check_loss_value(loss, len(x))
            for name in list(sums):  # each batch's float32 values dropped as they are added up
                gradient, diagonal = sums.pop(name)
                totals[name] = [float64_sum([totals[name][0], gradient]), float64_sum([totals[name][1], diagonal])]
        found = {}
        for name, (gradient, diagonal) in totals.items():
            if not np.all(np.isfinite(diagonal)):
                raise NonFiniteLossError(f"the Hessian diagonal of {name!r} is not finite")
            weight = self.targets[name].weight
            every = slice(0, weight.channels)
            found[name] = Derivatives(weight.to_weight(gradient, every), weight.to_weight(diagonal, every))
        return found

    def tensor_sums(self, name: str, batches, channels: slice | None = None) -> Derivatives:
        """float64 sums over ``batches`` of tensor ``name`` (not shared) for its shard-axis ``channels``."""
        return self.separate[name].compute_sums(batches, channel_slice(self.targets[name], channels))

    def hvp_compiler(self, name: str) -> str | None:
        """How the engine of tensor ``name`` (not shared) ran its last products: ``xla`` or ``graph`` (None if neither)."""
        separate = self.separate.get(name)
        return None if separate is None else getattr(separate.engine, "compiler", None)

    def stderr(self, name: str) -> np.ndarray | None:
        """The standard error of a stochastic tensor's last computed sums, else None."""
        separate = self.separate.get(name)
        return None if separate is None else separate.stderr

