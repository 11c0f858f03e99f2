"""The engines, each described once by what it can do; code elsewhere asks these flags, never an engine's name.

Modelled on curvlinops' operator flags: whether the result is exact, whether its cost grows with
the channels computed (so work units split channel groups), whether it needs all examples in one
block (its standard errors need each probe's whole-data estimate), whether it takes Hessian-vector
products through the suffix (so the second-derivative audit must verify it), whether it is exact
only for piecewise-linear suffixes, whether one pass serves every tensor of a unit, and whether
``compute.precision`` sets its arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import BadInputError

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes one worker's computation may use (``compute.memory_gb``)


@dataclass(frozen=True)
class Engine:
    """What an engine guarantees and needs."""

    name: str
    exact: bool
    splits_channels: bool
    whole_data: bool
    needs_audit: bool
    needs_piecewise_linear: bool
    shares_pass: bool
    summary: str
    samples_option: str | None = None  # the config key (``compute.*``) counting a stochastic engine's samples
    takes_precision: bool = False  # ``compute.precision`` sets its arithmetic


ENGINES: dict[str, Engine] = {
    "exact": Engine("exact", exact=True, splits_channels=True, whole_data=False, needs_audit=True,
                    needs_piecewise_linear=False, shares_pass=False, takes_precision=True,
                    summary="one Hessian-vector product of the suffix per entry (or per output position)"),
    "factored": Engine("factored", exact=True, splits_channels=False, whole_data=False, needs_audit=False,
                       needs_piecewise_linear=True, shares_pass=True,
                       summary="the loss-Hessian factor's columns back-propagated once for every tensor"),
    "hutchinson": Engine("hutchinson", exact=False, splits_channels=False, whole_data=True, needs_audit=True,
                         needs_piecewise_linear=False, shares_pass=False,
                         summary="stochastic estimate from Rademacher probes, not exact", samples_option="probes"),
    "monte_carlo": Engine("monte_carlo", exact=False, splits_channels=False, whole_data=True, needs_audit=False,
                          needs_piecewise_linear=True, shares_pass=False,
                          summary="Monte-Carlo sampled loss-Hessian factors, not exact", samples_option="samples"),
}
ENGINE_NAMES = ("auto", *ENGINES)


@dataclass(frozen=True)
class EngineChoice:
    """The engine that will run for one tensor, and why."""

    engine: Engine
    reason: str

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def exact(self) -> bool:
        return self.engine.exact


def choose_engine(requested: str, piecewise_linear: bool, suffix_reason: str) -> EngineChoice:
    """Resolve ``auto`` (the factored engine where it is exact, else the exact one) and refuse an engine whose
    exactness or estimate needs a piecewise-linear suffix where the suffix is not."""
    if requested not in ENGINE_NAMES:
        raise BadInputError(f"unknown engine {requested!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if requested == "auto":
        engine = ENGINES["factored" if piecewise_linear else "exact"]
        return EngineChoice(engine, f"auto: {suffix_reason}")
    engine = ENGINES[requested]
    if engine.needs_piecewise_linear and not piecewise_linear:
        if engine.exact:
            raise BadInputError(f"engine {requested!r} would not be exact: {suffix_reason}; use 'exact' or 'auto'")
        raise BadInputError(f"engine {requested!r} needs a piecewise-linear suffix: {suffix_reason}; use 'hutchinson'")
    if not engine.exact:
        return EngineChoice(engine, f"requested: {engine.summary}")
    return EngineChoice(engine, f"requested: {suffix_reason}")


def build_engine(choice: EngineChoice, problem, peel_softmax: bool, *, jit_compile: bool, chunk_size: int = 128,
                 column_chunk: int = 16, probes: int = 64, samples: int = 16, seed: int = 0, precision: str = "float32",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """The engine object for one tensor's ``problem`` (``pipeline.curvature.problem.Problem``)."""
    from pipeline.curvature.exact import ExactEngine
    from pipeline.curvature.factored import FactoredEngine
    from pipeline.curvature.stochastic import HutchinsonEngine, MonteCarloFactorEngine

    builders = {
        "exact": lambda: ExactEngine(problem, chunk_size, jit_compile=jit_compile, precision=precision,
                                     memory_budget=memory_budget),
        "factored": lambda: FactoredEngine(problem, peel_softmax, column_chunk, memory_budget),
        "hutchinson": lambda: HutchinsonEngine(problem, probes=probes, seed=seed),
        "monte_carlo": lambda: MonteCarloFactorEngine(problem, peel_softmax, samples=samples, seed=seed),
    }
    return builders[choice.name]()
