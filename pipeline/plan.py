"""Pure planning: tensors, shards, work units and validation samples. No TensorFlow, no Ray.

A shard is ``shard_size`` channels of one tensor along its shard axis: one stored chunk. Work units:

* the shared unit of block b computes every tensor of the shared pass (the factored engine's
  columns go down once per example block past all of them) over examples of block b;
* a tensor of its own engine gets units (tensor, channel group, example block): a group is one
  shard for engines whose cost grows with the channels computed, all channels for the others.

Each unit belongs to one fold chain (the shared one, or one tensor's channel group), whose blocks'
partial sums fold in block order. Guarantees: every tensor's shards are contiguous, disjoint and
cover each of its channels once; the units of a chain cover every example once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHARED = "s"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: its name (``layer/weight``), shape, shard axis, and how its engine divides work."""

    name: str
    shape: tuple[int, ...]
    shard_axis: int
    dims: tuple[str, ...]
    shared: bool
    splits_channels: bool
    whole_data: bool

    @property
    def channels(self) -> int:
        return self.shape[self.shard_axis]

    @property
    def entries(self) -> int:
        return math.prod(self.shape)

    @property
    def entries_per_channel(self) -> int:
        return self.entries // self.channels


@dataclass(frozen=True)
class Shard:
    """Channels ``start:stop`` of tensor ``tensor``; ``index`` names its chunk within the tensor."""

    tensor: int
    index: int
    start: int
    stop: int

    @property
    def channels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"t{self.tensor:04d}-s{self.index:05d}"


@dataclass(frozen=True)
class Unit:
    """Examples ``first:last`` (block ``block``) of a fold chain: the shared pass (``tensor`` None) or
    channels ``start:stop`` (group ``group``) of one tensor."""

    tensor: int | None
    group: int
    block: int
    start: int
    stop: int
    first: int
    last: int

    @property
    def chain(self) -> str:
        return SHARED if self.tensor is None else f"t{self.tensor:04d}-g{self.group:05d}"

    @property
    def channels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def examples(self) -> int:
        return self.last - self.first

    @property
    def name(self) -> str:
        return f"{self.chain}-b{self.block:05d}"


@dataclass(frozen=True)
class Plan:
    """What a run will compute: the tensors, their shards, the work units."""

    tensors: tuple[TensorPlan, ...]
    shard_size: int
    examples: int = 0
    example_block: int = 1

    @property
    def blocks(self) -> int:
        return -(-self.examples // self.example_block)

    def blocks_of(self, tensor: TensorPlan) -> int:
        return 1 if tensor.whole_data else self.blocks

    def block_size_of(self, tensor: TensorPlan) -> int:
        return self.examples if tensor.whole_data else self.example_block

    @property
    def shared(self) -> tuple[int, ...]:
        """Indices of the tensors of the shared pass."""
        return tuple(i for i, t in enumerate(self.tensors) if t.shared)

    def shards_of(self, tensor: int) -> tuple[Shard, ...]:
        channels = self.tensors[tensor].channels
        return tuple(Shard(tensor, i, start, min(start + self.shard_size, channels))
                     for i, start in enumerate(range(0, channels, self.shard_size)))

    @property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(s for t in range(len(self.tensors)) for s in self.shards_of(t))

    def groups_of(self, tensor: int) -> tuple[tuple[int, int], ...]:
        """Channel range of each of a separate tensor's groups."""
        t = self.tensors[tensor]
        if t.splits_channels:
            return tuple((s.start, s.stop) for s in self.shards_of(tensor))
        return ((0, t.channels),)

    def _blocks(self, examples_per_block: int):
        for block in range(-(-self.examples // examples_per_block)):
            yield block, block * examples_per_block, min((block + 1) * examples_per_block, self.examples)

    @property
    def units(self) -> tuple[Unit, ...]:
        found = []
        if self.shared:
            found += [Unit(None, 0, b, 0, 0, first, last) for b, first, last in self._blocks(self.example_block)]
        for index, tensor in enumerate(self.tensors):
            if tensor.shared:
                continue
            for g, (start, stop) in enumerate(self.groups_of(index)):
                found += [Unit(index, g, b, start, stop, first, last)
                          for b, first, last in self._blocks(self.block_size_of(tensor))]
        return tuple(found)

    def chains(self) -> dict[str, tuple[Unit, ...]]:
        """Units by fold chain, in block order."""
        found: dict[str, list[Unit]] = {}
        for unit in self.units:
            found.setdefault(unit.chain, []).append(unit)
        return {chain: tuple(units) for chain, units in found.items()}

    def chain_tensors(self, chain: str) -> tuple[int, ...]:
        if chain == SHARED:
            return self.shared
        return (int(chain[1:5]),)

    def chain_shards(self, chain: str) -> tuple[Shard, ...]:
        """The shards a chain writes once all its blocks are folded."""
        if chain == SHARED:
            return tuple(s for t in self.shared for s in self.shards_of(t))
        unit = self.chains()[chain][0]
        return tuple(s for s in self.shards_of(unit.tensor) if unit.start <= s.start and s.stop <= unit.stop)

    def unit_tensors(self, unit: Unit) -> tuple[int, ...]:
        return self.shared if unit.tensor is None else (unit.tensor,)

    def unit_result_bytes(self, unit: Unit) -> int:
        """Bytes of one unit's float64 partial sums (gradient and diagonal)."""
        if unit.tensor is None:
            return sum(2 * 8 * self.tensors[t].entries for t in self.shared)
        tensor = self.tensors[unit.tensor]
        return 2 * 8 * tensor.entries_per_channel * (unit.stop - unit.start)

    @property
    def entries(self) -> int:
        return sum(t.entries for t in self.tensors)

    def shard_of_channel(self, tensor: int, channel: int) -> Shard:
        return self.shards_of(tensor)[channel // self.shard_size]


def plan_units(tensors: tuple[TensorPlan, ...], shard_size: int, examples: int = 0, example_block: int = 1) -> Plan:
    """The plan for ``tensors``: shards of ``shard_size`` channels, units of ``example_block`` examples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if example_block < 1:
        raise ValueError(f"example_block must be positive, got {example_block}")
    return Plan(tuple(tensors), shard_size, examples, example_block)


def auto_example_block(seconds_per_example: float, unit_seconds: float, batch_size: int, examples: int) -> int:
    """Examples per unit so that a unit takes about ``unit_seconds``: a multiple of the batch size, at most all."""
    batches = max(1, int(unit_seconds / max(seconds_per_example, 1e-9) / batch_size))
    return min(batches * batch_size, max(examples, 1))


def unit_seconds(plan: Plan, unit: Unit, seconds_per_example: dict[str, float]) -> float:
    """Predicted seconds of a unit from the calibrated seconds per example of its chain's work.

    ``seconds_per_example`` maps ``shared`` to the shared pass's and each separate tensor's name to
    what one example costs over all its channels; a group pays its share of the channels.
    """
    if unit.tensor is None:
        return unit.examples * seconds_per_example["shared"]
    tensor = plan.tensors[unit.tensor]
    share = (unit.stop - unit.start) / tensor.channels
    return unit.examples * seconds_per_example[tensor.name] * share


def predicted_wall_seconds(plan: Plan, seconds_per_example: dict[str, float], workers: int,
                           tracing_seconds: dict[str, float] | None = None) -> float:
    """Wall time of the units on ``workers`` equal workers taking units in order (list scheduling). A worker pays a
    tensor's (or the shared pass's, ``shared``) ``tracing_seconds`` once, before its first unit of that work."""
    tracing = tracing_seconds or {}
    finish = [0.0] * workers
    traced: list[set[str]] = [set() for _ in range(workers)]
    for unit in plan.units:
        slot = finish.index(min(finish))
        work = "shared" if unit.tensor is None else plan.tensors[unit.tensor].name
        if work not in traced[slot]:
            traced[slot].add(work)
            finish[slot] += tracing.get(work, 0.0)
        finish[slot] += unit_seconds(plan, unit, seconds_per_example)
    return max(finish)


def sample_counts(plan: Plan, samples: int, floor: int = 2) -> list[int]:
    """Validation samples per tensor: at least ``floor`` each, the rest of ``samples`` in proportion to the square
    root of each tensor's size; never more than a tensor's entries. 0 disables validation."""
    if samples <= 0:
        return [0] * len(plan.tensors)
    counts = [min(floor, t.entries) for t in plan.tensors]
    extra = max(0, samples - sum(counts))
    weights = np.sqrt([t.entries for t in plan.tensors])
    shares = np.floor(extra * weights / weights.sum()).astype(int)
    for i in np.argsort(-weights)[: extra - int(shares.sum())]:
        shares[i] += 1
    return [min(c + int(s), t.entries) for c, s, t in zip(counts, shares, plan.tensors)]


def sample_indices(plan: Plan, tensor: int, samples: int, seed: int) -> list[tuple[int, ...]]:
    """``samples`` distinct multi-indices of tensor ``tensor``, round-robin over its shards so every shard is
    covered (when ``samples`` is smaller than the number of shards, shards are chosen evenly)."""
    if samples <= 0:
        return []
    spec = plan.tensors[tensor]
    shards = plan.shards_of(tensor)
    rng = np.random.default_rng([seed, tensor])
    picks = np.unique(np.linspace(0, len(shards) - 1, min(samples, len(shards))).round().astype(int))
    order = [shards[i] for i in picks]
    limit = min(samples, sum(spec.entries_per_channel * s.width for s in order))
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < limit:
        for shard in order:
            if len(chosen) == limit:
                break
            index = [int(rng.integers(0, d)) for d in spec.shape]
            index[spec.shard_axis] = int(rng.integers(shard.start, shard.stop))
            if tuple(index) not in chosen:
                chosen.append(tuple(index))
    return chosen
