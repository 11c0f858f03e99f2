"""Pure planning: shards, work units and validation samples. No TensorFlow, no Ray.

A shard is ``shard_size`` output channels of W: one stored chunk. A work unit is
(channel group, example block): a group is one shard for the exact engine, whose
cost grows with entries, and all channels for the others, whose dominant cost (the
factor columns' back-propagation, or a probe's Hessian-vector product) is paid once
per example whatever the channel width, so no unit repeats it for another slice.

Guarantees: the shards' channel ranges are contiguous, disjoint and cover every
output channel once; the units of a group cover every example once, in blocks
whose partial sums are folded in block order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    """Output channels ``start:stop`` of W, over all data; ``index`` names its chunk."""

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
        return f"shard-{self.index:05d}"


@dataclass(frozen=True)
class Unit:
    """Channels ``start:stop`` (channel group ``group``) over examples ``first:last`` (block ``block``)."""

    group: int
    block: int
    start: int
    stop: int
    first: int
    last: int

    @property
    def channels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def examples(self) -> int:
        return self.last - self.first

    @property
    def name(self) -> str:
        return f"g{self.group:05d}-b{self.block:05d}"


@dataclass(frozen=True)
class Plan:
    """What a run will compute: the weight's shape, its shards, and the work units."""

    weight_shape: tuple[int, ...]
    shard_size: int
    shards: tuple[Shard, ...]
    examples: int = 0
    example_block: int = 1
    groups: tuple[tuple[int, int], ...] = ()  # channel range of each group

    @property
    def blocks(self) -> int:
        return -(-self.examples // self.example_block)

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(
            Unit(g, b, start, stop, b * self.example_block, min((b + 1) * self.example_block, self.examples))
            for g, (start, stop) in enumerate(self.groups) for b in range(self.blocks)
        )

    def shards_of(self, group: int) -> tuple[Shard, ...]:
        start, stop = self.groups[group]
        return tuple(s for s in self.shards if start <= s.start and s.stop <= stop)

    def unit_result_bytes(self, unit: Unit) -> int:
        """Bytes of one unit's float64 partial sums (gradient and diagonal)."""
        return 2 * 8 * self.entries_per_channel * (unit.stop - unit.start)

    @property
    def entries(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def entries_per_channel(self) -> int:
        return math.prod(self.weight_shape[:-1])

    def shard_of_channel(self, channel: int) -> Shard:
        return self.shards[channel // self.shard_size]


def plan_shards(weight_shape: tuple[int, ...], shard_size: int, examples: int = 0, example_block: int = 1,
                split_channels: bool = True) -> Plan:
    """Shards of ``shard_size`` channels; units over channel groups (one per shard when ``split_channels``,
    else one for all channels) and blocks of ``example_block`` examples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if example_block < 1:
        raise ValueError(f"example_block must be positive, got {example_block}")
    channels = weight_shape[-1]
    shards = tuple(
        Shard(index=i, start=start, stop=min(start + shard_size, channels))
        for i, start in enumerate(range(0, channels, shard_size))
    )
    groups = tuple((s.start, s.stop) for s in shards) if split_channels else ((0, channels),)
    return Plan(weight_shape=tuple(weight_shape), shard_size=shard_size, shards=shards, examples=examples,
                example_block=example_block, groups=groups)


def auto_example_block(seconds_per_example: float, unit_seconds: float, batch_size: int, examples: int) -> int:
    """Examples per unit so that a unit takes about ``unit_seconds``: a multiple of the batch size, at most all."""
    batches = max(1, int(unit_seconds / max(seconds_per_example, 1e-9) / batch_size))
    return min(batches * batch_size, max(examples, 1))


def predicted_wall_seconds(plan: Plan, seconds_per_example: float, workers: int) -> float:
    """Wall time of the units on ``workers`` equal workers taking units in order (list scheduling)."""
    finish = [0.0] * workers
    for unit in plan.units:
        slot = finish.index(min(finish))
        finish[slot] += unit.examples * seconds_per_example
    return max(finish)


def sample_indices(plan: Plan, samples: int, seed: int) -> list[tuple[int, ...]]:
    """``samples`` distinct multi-indices of W, round-robin over shards so every shard is covered.

    When ``samples`` is smaller than the number of shards, shards are chosen evenly.
    """
    if samples <= 0:
        return []
    rng = np.random.default_rng(seed)
    picks = np.unique(np.linspace(0, len(plan.shards) - 1, min(samples, len(plan.shards))).round().astype(int))
    order = [plan.shards[i] for i in picks]
    limit = min(samples, sum(plan.entries_per_channel * s.width for s in order))
    inner = plan.weight_shape[:-1]
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < limit:
        for shard in order:
            if len(chosen) == limit:
                break
            index = tuple(int(rng.integers(0, d)) for d in inner) + (int(rng.integers(shard.start, shard.stop)),)
            if index not in chosen:
                chosen.append(index)
    return chosen
