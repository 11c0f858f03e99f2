"""End-to-end runs on a real local Ray and real Zarr stores: results, determinism, retries, resume."""

import shutil
import threading
import time

import numpy as np
import pytest
import xarray as xr

from pipeline.coordinator import run
from pipeline.curvature import layer_derivatives
from pipeline.job import Job
from pipeline.store import ResultStore
from tests.cluster import kill_driver_when, start_driver
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
    assert result.passed and result.engine == "factored" and sorted(result.computed) == list(range(16))
    job = Job.load(config)
    options = dict(loss=config.loss.name, batch_size=config.data.batch_size)
    shards = [
        layer_derivatives(job.model, "block2_conv1", job.x, job.y, engine="factored", out_channels=shard.channels, **options)
        for shard in job.plan().shards
    ]
    whole = layer_derivatives(job.model, "block2_conv1", job.x, job.y, engine="factored", **options)
    exact = layer_derivatives(job.model, "block2_conv1", job.x, job.y, engine="exact", out_channels=slice(20, 22), **options)
    gradient, diagonal = arrays(path)
    np.testing.assert_array_equal(gradient, np.concatenate([s.gradient for s in shards], axis=-1))
    np.testing.assert_array_equal(diagonal, np.concatenate([s.hessian_diagonal for s in shards], axis=-1))
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
        if names and store_ok and ResultStore.open(str(tmp_path / "s.zarr"), mode="r").manifest():
            killed = names[0]
            ray.kill(ray.get_actor(killed))
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed, "no actor was killed"
    result = outcome["result"]
    assert result.retries >= 1
    for mine, theirs in zip(arrays(tmp_path / "s.zarr"), arrays(path)):
        np.testing.assert_array_equal(mine, theirs)


def recorded(path) -> int:
    """Shards recorded done in the store at ``path`` (0 before it exists)."""
    return len(ResultStore.open(str(path), mode="r").manifest()) if ResultStore.exists(str(path)) else 0


def test_driver_sigkill_then_rerun_finishes_only_missing_shards(reference, tmp_path):
    _, _, path = reference
    out = tmp_path / "s.zarr"
    config_path = write_config(tmp_path / "c.yaml", tiny_raw(out, validation={"samples": 0}))
    kill_driver_when(start_driver(config_path), lambda: recorded(out) >= 3)
    done_before = ResultStore.open(str(out), mode="r").manifest()
    assert 3 <= len(done_before) < 16
    assert ResultStore.open(str(out), mode="r").lock_info() is not None  # left behind by the killed driver
    result = run(tiny_config(out, validation={"samples": 0}), live=False)
    assert sorted(result.computed) == sorted(set(range(16)) - set(done_before))
    assert sorted(result.skipped) == sorted(done_before)
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
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(out)])
    assert exit_info.value.code == 3
    result = run(tiny_config(out), live=False)
    assert sorted(result.computed) == [5, 11] and result.recomputed_corrupt == [5, 11]
    for mine, theirs in zip(arrays(out), arrays(path)):
        np.testing.assert_array_equal(mine, theirs)
