"""Folding partial sums: the same bits whatever order units finish in, and safe across crashes."""

import itertools

import numpy as np
import pytest

from pipeline.plan import TensorPlan, plan_units
from pipeline.reduction import clean_chain, fold_chain, latest_running, running_name, sum_name, unit_state
from pipeline.store import ResultStore

TENSORS = (TensorPlan("a/kernel", (3, 2, 6), 2, ("k", "in_channel", "out_channel"), True, False, False),
           TensorPlan("b/bias", (4,), 0, ("out_channel",), True, False, False))


def _plan(examples, block, shard_size=4):
    return plan_units(TENSORS, shard_size, examples, block)


def _partials(plan, seed=0):
    """Each block's sums for every tensor, with wildly different magnitudes: float addition order shows in the last bits."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(plan.blocks):
        part = {}
        for index, tensor in enumerate(plan.tensors):
            part[sum_name(index, "gradient")] = rng.normal(size=tensor.shape) * 10.0 ** rng.integers(-8, 8, tensor.shape)
            part[sum_name(index, "hessian_diagonal")] = rng.normal(size=tensor.shape)
        parts.append(part)
    return parts


def _store(tmp_path, name, plan):
    return ResultStore.create(str(tmp_path / name), {}, plan, {"config_fingerprint": "x"})


def _weights(index):
    return np.arange(np.prod(TENSORS[index].shape), dtype=float).reshape(TENSORS[index].shape)


def _expected(parts, plan, index, quantity):
    total = parts[0][sum_name(index, quantity)]
    for part in parts[1:]:
        total = total + part[sum_name(index, quantity)]
    return total / plan.examples


def _check(store, plan, parts):
    for index, tensor in enumerate(plan.tensors):
        arrays = store.tensor_arrays(tensor.name)
        np.testing.assert_array_equal(arrays["gradient"], _expected(parts, plan, index, "gradient"))
        diagonal = _expected(parts, plan, index, "hessian_diagonal")
        np.testing.assert_array_equal(arrays["hessian_diagonal"], diagonal)
        np.testing.assert_array_equal(arrays["saliency"], 0.5 * diagonal * _weights(index) ** 2)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_any_finishing_order_gives_the_sequential_fold_bit_for_bit(tmp_path, order):
    plan = _plan(40, 10)
    parts = _partials(plan)
    store = _store(tmp_path, "s.zarr", plan)
    units = plan.chains()["s"]
    for block in order:
        store.write_sums("partials", units[block].name, parts[block].items())
        fold_chain(store, plan, "s", _weights)
        finished = set(order[: order.index(block) + 1])
        folded = next(b for b in range(5) if b not in finished)
        assert latest_running(store, "s")[0] == (0 if folded == 4 else folded)  # the chain completes at 4
        assert store.sums_list("partials") == sorted(units[b].name for b in finished if b > folded)
    _check(store, plan, parts)
    assert store.sums_list("partials") == [] and store.sums_list("running") == []
    assert len(store.verify(plan)[0]) == len(plan.shards)


def test_crash_between_writing_and_deleting_is_recovered(tmp_path):
    plan = _plan(30, 10)
    parts = _partials(plan, seed=1)
    store = _store(tmp_path, "s.zarr", plan)
    units = plan.chains()["s"]
    store.write_sums("partials", units[0].name, parts[0].items())
    store.write_sums("partials", units[1].name, parts[1].items())
    fold_chain(store, plan, "s", _weights)
    assert latest_running(store, "s")[0] == 2
    # a crash left: the running sum of 1 block (its successor is complete), a half-written partial of block 2
    store.write_sums("running", running_name("s", 1), parts[0].items())
    store.group.require_group("partials").create_group(units[2].name)
    assert [u.block for u in unit_state(store, plan, set()).todo] == [2]
    clean_chain(store, plan, "s")
    assert store.sums_list("running") == [running_name("s", 2)] and store.sums_list("partials") == []
    store.write_sums("partials", units[2].name, parts[2].items())
    assert fold_chain(store, plan, "s", _weights)
    _check(store, plan, parts)


def test_a_corrupt_partial_is_not_counted(tmp_path):
    plan = _plan(20, 10)
    store = _store(tmp_path, "s.zarr", plan)
    unit = plan.chains()["s"][1]
    store.write_sums("partials", unit.name, _partials(plan)[1].items())
    chunk = tmp_path / "s.zarr" / "partials" / unit.name / sum_name(0, "hessian_diagonal") / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage")
    assert [u.block for u in unit_state(store, plan, set()).todo] == [0, 1]


def test_separate_tensor_chains_fold_their_channel_groups(tmp_path):
    """An exact-engine tensor: one chain per channel group, each writing only its own shards."""
    tensor = TensorPlan("c/kernel", (2, 6), 1, ("in_feature", "out_channel"), False, True, False)
    plan = plan_units((tensor,), 4, 20, 10)
    assert list(plan.chains()) == ["t0000-g00000", "t0000-g00001"]
    store = _store(tmp_path, "s.zarr", plan)
    rng = np.random.default_rng(3)
    for unit in plan.units:
        width = unit.stop - unit.start
        store.write_sums("partials", unit.name, [(sum_name(0, q), rng.normal(size=(2, width))) for q in ("gradient", "hessian_diagonal")])
    assert fold_chain(store, plan, "t0000-g00001", lambda index: np.ones((2, 6)))
    done = {s.name for s in store.verify(plan)[0]}
    assert done == {"t0000-s00001"}
    assert [u.chain for u in unit_state(store, plan, done).todo] == []  # group 0's partials are ready, not yet folded
    assert fold_chain(store, plan, "t0000-g00000", lambda index: np.ones((2, 6)))
    assert len(store.verify(plan)[0]) == 2
