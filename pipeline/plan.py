"""Pure planning: shards of the target tensor and validation samples. No TensorFlow, no Ray.

Guarantee: the shards' channel ranges are contiguous, disjoint, and cover
every output channel exactly once, so the union of shards indexes every entry
of W exactly once.
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
class Plan:
    """What a run will compute: the weight's shape and its shards."""

    weight_shape: tuple[int, ...]
    shard_size: int
    shards: tuple[Shard, ...]

    @property
    def entries(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def entries_per_channel(self) -> int:
        return math.prod(self.weight_shape[:-1])

    def shard_result_bytes(self, shard: Shard) -> int:
        """Bytes of one shard's gradient and diagonal in float64."""
        return 2 * 8 * self.entries_per_channel * shard.width

    def shard_of_channel(self, channel: int) -> Shard:
        return self.shards[channel // self.shard_size]


def plan_shards(weight_shape: tuple[int, ...], shard_size: int) -> Plan:
    """Split the last (output-channel) axis into shards of ``shard_size`` channels."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    channels = weight_shape[-1]
    shards = tuple(
        Shard(index=i, start=start, stop=min(start + shard_size, channels))
        for i, start in enumerate(range(0, channels, shard_size))
    )
    return Plan(weight_shape=tuple(weight_shape), shard_size=shard_size, shards=shards)


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
