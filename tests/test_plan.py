import itertools

import numpy as np
import pytest

from pipeline.plan import TensorPlan, auto_example_block, plan_units, predicted_wall_seconds, sample_counts, sample_indices


def tensor(shape, name="t/kernel", shard_axis=-1, shared=False, splits=True, whole=False):
    axis = shard_axis % len(shape)
    return TensorPlan(name, tuple(shape), axis, tuple(f"d{i}" for i in range(len(shape))), shared, splits, whole)


@pytest.mark.parametrize("channels,shard_size", [(1, 1), (7, 3), (64, 8), (10, 16), (512, 5)])
@pytest.mark.parametrize("axis", [-1, 2])
def test_shards_cover_every_channel_exactly_once(channels, shard_size, axis):
    shape = [3, 3, 2, 4]
    shape[axis] = channels
    plan = plan_units((tensor(shape, shard_axis=axis),), shard_size)
    covered = np.zeros(channels, int)
    for shard in plan.shards_of(0):
        assert 0 < shard.width <= shard_size
        covered[shard.channels] += 1
    assert covered.tolist() == [1] * channels
    assert [s.index for s in plan.shards_of(0)] == list(range(len(plan.shards_of(0))))
    assert all(plan.shard_of_channel(0, c).start <= c < plan.shard_of_channel(0, c).stop for c in range(channels))


@pytest.mark.parametrize("samples", [1, 3, 8, 20])
def test_samples_are_distinct_in_range_and_cover_shards(samples):
    plan = plan_units((tensor((3, 3, 10, 2), shard_axis=2),), 3)
    indices = sample_indices(plan, 0, samples, seed=1)
    assert len(indices) == samples == len(set(indices))
    for index in indices:
        assert all(0 <= i < d for i, d in zip(index, plan.tensors[0].shape))
    covered = {plan.shard_of_channel(0, i[2]).index for i in indices}
    assert len(covered) == min(samples, len(plan.shards_of(0)))
    assert sample_indices(plan, 0, samples, seed=1) == indices


def test_samples_never_exceed_entries():
    plan = plan_units((tensor((2, 2)),), 1)
    assert sorted(sample_indices(plan, 0, 50, seed=0)) == list(itertools.product(range(2), range(2)))


def test_sample_counts_give_every_tensor_two_and_larger_ones_more():
    plan = plan_units((tensor((100, 100), "a/kernel"), tensor((100,), "a/bias"), tensor((1,), "b/bias")), 8)
    counts = sample_counts(plan, 20)
    assert counts[1] >= 2 and counts[2] == 1 and counts[0] > counts[1]  # a one-entry tensor has one entry to sample
    assert sum(counts) == 20
    assert sample_counts(plan, 2) == [2, 2, 1]  # the floor wins over a smaller total
    assert sample_counts(plan, 0) == [0, 0, 0]


@pytest.mark.parametrize("examples,block", [(1, 1), (100, 7), (64, 64), (65, 64), (10, 1000)])
def test_units_cover_every_tensor_channel_and_example_exactly_once(examples, block):
    tensors = (tensor((3, 10), "shared/kernel", shared=True, splits=False), tensor((2, 10), "exact/kernel"),
               tensor((4, 6), "stochastic/kernel", splits=False, whole=True))
    plan = plan_units(tensors, 4, examples, block)
    covered = {t.name: np.zeros((t.channels, examples), int) for t in tensors}
    for unit in plan.units:
        for index in plan.unit_tensors(unit):
            channels = slice(0, tensors[index].channels) if unit.tensor is None else unit.channels
            covered[tensors[index].name][channels, unit.first : unit.last] += 1
        limit = examples if unit.tensor == 2 else block
        assert 0 < unit.examples <= limit
    assert all((c == 1).all() for c in covered.values())
    chains = plan.chains()
    assert len(chains["s"]) == plan.blocks  # the shared pass: one unit per block for every shared tensor
    assert len([c for c in chains if c.startswith("t0001")]) == 3  # the exact tensor: one chain per shard
    assert len(chains["t0002-g00000"]) == 1  # whole data in one block
    for chain in chains:  # a chain's shards are exactly its tensors' channels
        shards = plan.chain_shards(chain)
        assert shards and all(s.tensor in plan.chain_tensors(chain) for s in shards)
    assert sorted(s.name for c in chains for s in plan.chain_shards(c)) == sorted(s.name for s in plan.shards)


def test_auto_block_is_a_multiple_of_the_batch_near_the_unit_time():
    assert auto_example_block(seconds_per_example=0.5, unit_seconds=120, batch_size=16, examples=10_000) == 240
    assert auto_example_block(0.5, 120, 16, 100) == 100  # never more than all examples
    assert auto_example_block(1000.0, 120, 16, 10_000) == 16  # at least one batch


def test_predicted_wall_time_divides_the_units():
    tensors = (tensor((3, 8), "shared/kernel", shared=True, splits=False), tensor((3, 8), "exact/kernel"))
    plan = plan_units(tensors, 4, examples=64, example_block=8)  # 8 shared units of 8 examples, 16 exact ones of 4 channels
    seconds = {"shared": 1.0, "exact/kernel": 2.0}  # the exact tensor: 2 s per example over all its 8 channels
    assert predicted_wall_seconds(plan, seconds, 1) == 64 + 128
    assert predicted_wall_seconds(plan, seconds, 2) == 96
    assert predicted_wall_seconds(plan, seconds, 64) == 8  # never below one unit
    tracing = {"shared": 5.0, "exact/kernel": 10.0}  # paid once per worker, before its first unit of that work
    assert predicted_wall_seconds(plan, seconds, 1, tracing) == 64 + 128 + 5 + 10
    assert predicted_wall_seconds(plan, seconds, 64, tracing) == 8 + 10  # each worker traces what it runs
