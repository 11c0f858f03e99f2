import itertools

import numpy as np
import pytest

from pipeline.plan import plan_shards, sample_indices


@pytest.mark.parametrize("channels,shard_size", [(1, 1), (7, 3), (64, 8), (10, 16), (512, 5)])
def test_shards_cover_every_channel_exactly_once(channels, shard_size):
    plan = plan_shards((3, 3, 2, channels), shard_size)
    covered = np.zeros(channels, int)
    for shard in plan.shards:
        assert 0 < shard.width <= shard_size
        covered[shard.channels] += 1
    assert covered.tolist() == [1] * channels
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))
    assert all(plan.shard_of_channel(c).start <= c < plan.shard_of_channel(c).stop for c in range(channels))


@pytest.mark.parametrize("samples", [1, 3, 8, 20])
def test_samples_are_distinct_in_range_and_cover_shards(samples):
    plan = plan_shards((3, 3, 2, 10), 3)
    indices = sample_indices(plan, samples, seed=1)
    assert len(indices) == samples == len(set(indices))
    for index in indices:
        assert all(0 <= i < d for i, d in zip(index, plan.weight_shape))
    covered = {plan.shard_of_channel(i[-1]).index for i in indices}
    assert len(covered) == min(samples, len(plan.shards))
    assert sample_indices(plan, samples, seed=1) == indices


def test_samples_never_exceed_entries():
    plan = plan_shards((2, 2), 1)
    indices = sample_indices(plan, 50, seed=0)
    assert sorted(indices) == list(itertools.product(range(2), range(2)))
