"""Folding partial sums: the same bits whatever order units finish in, and safe across crashes."""

import itertools

import numpy as np
import pytest

from pipeline.plan import plan_shards
from pipeline.reduction import clean_group, fold_group, folded_blocks, partial_name, running_name, unit_state
from pipeline.store import ResultStore


def _partials(plan, seed=0):
    rng = np.random.default_rng(seed)
    shape = plan.weight_shape[:-1] + (plan.groups[0][1] - plan.groups[0][0],)
    # wildly different magnitudes make float addition order visible in the last bits
    return [(rng.normal(size=shape) * 10.0 ** rng.integers(-8, 8, shape), rng.normal(size=shape)) for _ in range(plan.blocks)]


def _store(tmp_path, name, plan):
    attrs = {"config_fingerprint": "x", "examples": plan.examples, "example_block": plan.example_block,
             "channel_groups": [list(g) for g in plan.groups], "shards": len(plan.shards)}
    return ResultStore.create(str(tmp_path / name), {}, plan, attrs)


def _sequential(parts, examples):
    gradient, diagonal = parts[0]
    for g, d in parts[1:]:
        gradient, diagonal = gradient + g, diagonal + d
    return gradient / examples, diagonal / examples


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_any_finishing_order_gives_the_sequential_fold_bit_for_bit(tmp_path, order):
    plan = plan_shards((3, 2, 6), 4, examples=40, example_block=10, split_channels=False)
    parts = _partials(plan)
    store = _store(tmp_path, "s.zarr", plan)
    for block in order:
        store.write_sums("partials", partial_name(0, block), *parts[block])
        fold_group(store, plan, 0)
        finished = set(order[: order.index(block) + 1])
        folded = next(b for b in range(5) if b not in finished)
        assert folded_blocks(store, 0) == (0 if folded == 4 else folded)  # the group completes at 4
        assert store.sums_names("partials") == sorted(partial_name(0, b) for b in finished if b > folded)
    gradient, diagonal = store.arrays()
    expected = _sequential(parts, plan.examples)
    np.testing.assert_array_equal(gradient, expected[0])
    np.testing.assert_array_equal(diagonal, expected[1])
    assert store.sums_names("partials") == [] and store.sums_names("running") == []
    assert len(store.verify(plan)[0]) == len(plan.shards)


def test_crash_between_writing_and_deleting_is_recovered(tmp_path):
    plan = plan_shards((3, 2, 6), 6, examples=30, example_block=10, split_channels=False)
    parts = _partials(plan, seed=1)
    store = _store(tmp_path, "s.zarr", plan)
    store.write_sums("partials", partial_name(0, 0), *parts[0])
    store.write_sums("partials", partial_name(0, 1), *parts[1])
    fold_group(store, plan, 0)
    assert folded_blocks(store, 0) == 2
    # a crash left: the running sum of 1 block (its successor is complete), a half-written partial of block 2
    store.write_sums("running", running_name(0, 1), *parts[0])
    store.group.require_group("partials").create_group(partial_name(0, 2))
    assert [u.block for u in unit_state(store, plan, set()).todo] == [2]
    clean_group(store, plan, 0)
    assert store.sums_names("running") == [running_name(0, 2)] and store.sums_names("partials") == []
    store.write_sums("partials", partial_name(0, 2), *parts[2])
    assert fold_group(store, plan, 0)
    expected = _sequential(parts, plan.examples)
    for got, want in zip(store.arrays(), expected):
        np.testing.assert_array_equal(got, want)


def test_a_corrupt_partial_is_not_counted(tmp_path):
    plan = plan_shards((3, 2, 6), 6, examples=20, example_block=10, split_channels=False)
    store = _store(tmp_path, "s.zarr", plan)
    store.write_sums("partials", partial_name(0, 1), *_partials(plan)[1])
    chunk = tmp_path / "s.zarr" / "partials" / partial_name(0, 1) / "hessian_diagonal" / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage")
    assert [u.block for u in unit_state(store, plan, set()).todo] == [0, 1]
