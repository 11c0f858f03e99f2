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


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("examples,block", [(1, 1), (100, 7), (64, 64), (65, 64), (10, 1000)])
def test_units_cover_every_channel_and_example_exactly_once(split, examples, block):
    from pipeline.plan import plan_shards

    plan = plan_shards((3, 3, 2, 10), 4, examples, block, split_channels=split)
    covered = np.zeros((10, examples), int)
    for unit in plan.units:
        assert 0 < unit.examples <= block
        covered[unit.channels, unit.first : unit.last] += 1
    assert (covered == 1).all()
    assert len(plan.groups) == (3 if split else 1) and plan.blocks == -(-examples // block)
    for group in range(len(plan.groups)):  # a group's shards tile exactly its channels
        shards = plan.shards_of(group)
        assert shards[0].start == plan.groups[group][0] and shards[-1].stop == plan.groups[group][1]


def test_auto_block_is_a_multiple_of_the_batch_near_the_unit_time():
    from pipeline.plan import auto_example_block

    assert auto_example_block(seconds_per_example=0.5, unit_seconds=120, batch_size=16, examples=10_000) == 240
    assert auto_example_block(0.5, 120, 16, 100) == 100  # never more than all examples
    assert auto_example_block(1000.0, 120, 16, 10_000) == 16  # at least one batch


def test_predicted_wall_time_divides_the_units():
    from pipeline.plan import plan_shards, predicted_wall_seconds

    plan = plan_shards((3, 3, 2, 8), 8, examples=64, example_block=8, split_channels=False)  # 8 units of 8 examples
    assert predicted_wall_seconds(plan, 1.0, 1) == 64
    assert predicted_wall_seconds(plan, 1.0, 2) == 32
    assert predicted_wall_seconds(plan, 1.0, 64) == 8  # never below one unit
