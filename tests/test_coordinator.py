"""End-to-end runs on a real local Ray and real Zarr stores: results, determinism, retries, resume."""

import shutil
import threading
import time

import numpy as np
import pytest
import xarray as xr

from pipeline.coordinator import run
from pipeline.curvature import LayerCurvature, batches_of, layer_derivatives
from pipeline.job import Job
from pipeline.store import ResultStore
from tests.cluster import kill_driver_when, recorded_units, start_driver
from tests.conftest import tiny_config, tiny_raw, write_config


def arrays(path):
    return ResultStore.open(str(path), mode="r").arrays()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """An undisturbed two-actor run: the baseline every other run must equal bit for bit."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    config = tiny_config(path)
    result = run(config, live=False)
    return config, result, path


def test_end_to_end_equals_in_process_core_and_validates(reference):
    config, result, path = reference
    # one channel group (factored: the column back-propagation is never repeated per slice) x 4 blocks of 64
    assert result.passed and result.engine == "factored" and sorted(result.computed) == [f"g00000-b{b:05d}" for b in range(4)]
    job = Job.load(config)
    x, y = job.read(0, job.examples)
    options = dict(loss=config.loss.name, batch_size=config.data.batch_size)
    curvature = LayerCurvature(job.model, "block2_conv1", loss=config.loss.name, engine="factored")
    folded = None
    for first in range(0, 256, 64):  # block sums folded in block order, as the coordinator does
        part = curvature.compute_sums(batches_of(x[first : first + 64], y[first : first + 64], 64))
        folded = part if folded is None else [a + b for a, b in zip(folded, part)]
    whole = layer_derivatives(job.model, "block2_conv1", x, y, engine="factored", **options)
    exact = layer_derivatives(job.model, "block2_conv1", x, y, engine="exact", out_channels=slice(20, 22), **options)
    gradient, diagonal = arrays(path)
    np.testing.assert_array_equal(gradient, folded[0] / 256)
    np.testing.assert_array_equal(diagonal, folded[1] / 256)
    np.testing.assert_allclose(diagonal, whole.hessian_diagonal, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(diagonal[..., 20:22], exact.hessian_diagonal, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(gradient[..., 20:22], exact.gradient, rtol=1e-5, atol=1e-9)
    assert exact.hessian_diagonal.std() > 0
    attrs = ResultStore.open(str(path), mode="r").attrs
    assert attrs["complete"] is True and attrs["engine"] == "factored"
    assert attrs["config_fingerprint"] == config.fingerprint() and len(attrs["model_fingerprint"]) == 64
    assert attrs["validation"]["passed"] is True and attrs["validation"]["samples"] == 8
    assert attrs["validation"]["max_rel_error"] < 1e-3
    assert attrs["validation"]["spot_check"]["passed"] is True


def test_xarray_opens_the_store_with_dimension_names(reference):
    _, _, path = reference
    ds = xr.open_zarr(str(path), consolidated=False)
    assert ds["gradient"].dims == ("kh", "kw", "in_channel", "out_channel")
    assert ds["hessian_diagonal"].shape == (3, 3, 32, 64)
    assert ds.attrs["engine"] == "factored"


@pytest.mark.parametrize("cluster", [{"num_workers": 1}, {"executor": "local"}], ids=["one_actor", "local_executor"])
def test_result_is_bit_identical_whatever_runs_it(reference, tmp_path, cluster):
    _, _, path = reference
    run(tiny_config(tmp_path / "s.zarr", cluster=cluster, validation={"samples": 0}), live=False)
    for mine, theirs in zip(arrays(tmp_path / "s.zarr"), arrays(path)):
        np.testing.assert_array_equal(mine, theirs)


def test_killed_actor_mid_shard_is_retried_bit_identical(reference, tmp_path):
    import ray

    _, _, path = reference
    config = tiny_config(tmp_path / "s.zarr", validation={"samples": 0})
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(config, live=False)))
    thread.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and thread.is_alive():
        names = [n for n in ray.util.list_named_actors() if "-worker0-" in n]
        store_ok = ResultStore.exists(str(tmp_path / "s.zarr"))
        if names and store_ok and ResultStore.open(str(tmp_path / "s.zarr"), mode="r").unit_records():
            killed = names[0]
            ray.kill(ray.get_actor(killed))
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed, "no actor was killed"
    result = outcome["result"]
    assert result.retries >= 1
    for mine, theirs in zip(arrays(tmp_path / "s.zarr"), arrays(path)):
        np.testing.assert_array_equal(mine, theirs)


def test_driver_sigkill_mid_unit_then_rerun_finishes_only_missing_units(reference, tmp_path):
    _, _, path = reference
    out = tmp_path / "s.zarr"
    config_path = write_config(tmp_path / "c.yaml", tiny_raw(out, validation={"samples": 0}))
    kill_driver_when(start_driver(config_path), lambda: recorded_units(out) >= 1)
    done_before = set(ResultStore.open(str(out), mode="r").unit_records())
    assert 1 <= len(done_before) < 4
    assert ResultStore.open(str(out), mode="r").lock_info() is not None  # left behind by the killed driver
    result = run(tiny_config(out, validation={"samples": 0}), live=False)
    assert done_before <= set(result.skipped) and not set(result.computed) & set(result.skipped)
    assert sorted(result.computed + result.skipped) == [f"g00000-b{b:05d}" for b in range(4)]
    reference_grad, reference_diag = arrays(path)
    gradient, diagonal = arrays(out)
    np.testing.assert_array_equal(gradient, reference_grad)
    np.testing.assert_array_equal(diagonal, reference_diag)


def test_corrupted_and_deleted_chunks_are_detected_then_recomputed(reference, tmp_path, capsys):
    from pipeline.cli import main

    _, _, path = reference
    out = tmp_path / "s.zarr"
    shutil.copytree(path, out)
    (out / "hessian_diagonal" / "c" / "0" / "0" / "0" / "5").write_bytes(b"garbage")
    (out / "gradient" / "c" / "0" / "0" / "0" / "11").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(out), "--json"])
    assert exit_info.value.code == 0
    status = __import__("json").loads(capsys.readouterr().out)
    assert status["corrupt"] == [5, 11] and status["shards_done"] == 14 and status["complete"] is False
    assert status["units_done"] == 0  # the group's shards are not all sound: its units must run again
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(out)])
    assert exit_info.value.code == 3
    result = run(tiny_config(out), live=False)
    assert sorted(result.computed) == [f"g00000-b{b:05d}" for b in range(4)] and result.recomputed_corrupt == [5, 11]
    for mine, theirs in zip(arrays(out), arrays(path)):
        np.testing.assert_array_equal(mine, theirs)
