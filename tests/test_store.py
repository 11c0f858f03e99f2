import os
import time

import numpy as np
import pytest
import xarray as xr

from pipeline.errors import BadInputError
from pipeline.plan import TensorPlan, plan_units
from pipeline.store import RESULT_ARRAYS, ResultStore, check_writable, checksum_of

KERNEL = TensorPlan("conv/kernel", (3, 3, 2, 10), 3, ("kh", "kw", "in_channel", "out_channel"), True, False, False)


@pytest.fixture
def store(tmp_path):
    plan = plan_units((KERNEL,), 4)
    return ResultStore.create(str(tmp_path / "s.zarr"), {}, plan, {"config_fingerprint": "x"}), plan


def _values(shard, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(3, 3, 2, shard.width)) for name in RESULT_ARRAYS}


def test_written_shard_verifies_and_reads_back(store):
    s, plan = store
    for shard in plan.shards[:2]:
        values = _values(shard, shard.index)
        checksum = s.write_shard(plan, shard, values)
        assert checksum == checksum_of(values[name] for name in RESULT_ARRAYS)
        s.record_done(shard, checksum, seconds=1.0)
        np.testing.assert_array_equal(s.read_shard(plan, shard)["hessian_diagonal"], values["hessian_diagonal"])
    done, corrupt, missing = s.verify(plan)
    assert [x.index for x in done] == [0, 1] and not corrupt and [x.index for x in missing] == [2]


def test_written_but_unrecorded_shard_is_not_done(store):
    s, plan = store
    s.write_shard(plan, plan.shards[0], _values(plan.shards[0], 0))
    assert [x.index for x in s.verify(plan)[2]] == [0, 1, 2]


def test_corrupted_and_deleted_chunks_are_detected(store, tmp_path):
    s, plan = store
    for shard in plan.shards:
        s.record_done(shard, s.write_shard(plan, shard, _values(shard, shard.index)))
    s.tensor_group("conv/kernel")["hessian_diagonal"][0, 0, 0, 5] = 123.0  # shard 1 altered in place
    os.remove(tmp_path / "s.zarr" / "params" / "conv" / "kernel" / "gradient" / "c" / "0" / "0" / "0" / "2")  # shard 2's
    done, corrupt, missing = s.verify(plan)
    assert [x.index for x in done] == [0] and [x.index for x in corrupt] == [1, 2] and not missing
    s.forget(plan.shards[1])
    assert [x.index for x in s.verify(plan)[2]] == [1]


def test_xarray_reads_arrays_with_dimension_names(store, tmp_path):
    s, plan = store
    for shard in plan.shards:
        s.record_done(shard, s.write_shard(plan, shard, _values(shard, shard.index)))
    ds = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr", consolidated=False)["params/conv/kernel"].to_dataset()
    assert set(ds.data_vars) == set(RESULT_ARRAYS)
    assert ds["hessian_diagonal"].dims == ("kh", "kw", "in_channel", "out_channel")
    np.testing.assert_array_equal(ds["gradient"].values[..., 4:8], s.read_shard(plan, plan.shards[1])["gradient"])


def test_lock_refuses_second_coordinator_and_recovers_stale_lock(store):
    s, _ = store
    token = s.acquire_lock()
    with pytest.raises(BadInputError, match="being written by another coordinator"):
        s.acquire_lock()
    s.group["lock"].attrs.update({"pid": 2**22 + 12345})  # owner process gone: stale
    second = s.acquire_lock()
    assert second != token
    s.group["lock"].attrs.update({"pid": os.getpid(), "heartbeat": time.time() - 10_000})  # heartbeat too old
    third = s.acquire_lock()
    s.release_lock(third)
    assert s.lock_info() is None


def test_unwritable_output_is_rejected(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(BadInputError, match="is not a writable directory"):
        check_writable(str(a_file / "s.zarr"), {})
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(BadInputError, match="is not writable"):
            check_writable(str(locked / "sub" / "s.zarr"), {})
    finally:
        locked.chmod(0o700)
