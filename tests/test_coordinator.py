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
from tests.stores import assert_same_results, results
from tests.cluster import kill_driver_when, recorded_units, start_driver
from tests.conftest import tiny_config, tiny_raw, write_config


# Three tensors of one shared pass: a conv kernel, its bias and a dense kernel.
TARGETS = {"targets": [{"layer": "block2_conv1"}, {"layer": "block2_conv1", "weight": "bias"}, {"layer": "fc1"}], "target": None}
UNITS = [f"s-b{b:05d}" for b in range(4)]


def config_of(path, **sections):
    return tiny_config(path, **TARGETS, **sections)


def raw_of(path, **sections):
    return tiny_raw(path, **TARGETS, **sections)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """An undisturbed two-actor run: the baseline every other run must equal bit for bit."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    config = config_of(path)
    result = run(config, live=False)
    return config, result, path


def test_end_to_end_equals_in_process_core_and_validates(reference):
    config, result, path = reference
    # one shared pass (the column back-propagation is never repeated per tensor or slice) x 4 blocks of 64
    assert result.passed and set(result.engines.values()) == {"factored"} and sorted(result.computed) == UNITS
    job = Job.load(config)
    x, y = job.read(0, job.examples)
    options = dict(loss=config.loss.name, batch_size=config.data.batch_size)
    stored = results(path)
    for layer, weight in (("block2_conv1", "kernel"), ("block2_conv1", "bias"), ("fc1", "kernel")):
        curvature = LayerCurvature(job.model, layer, weight=weight, loss=config.loss.name, engine="factored")
        folded = None
        for first in range(0, 256, 64):  # block sums folded in block order, as the coordinator does
            part = curvature.compute_sums(batches_of(x[first : first + 64], y[first : first + 64], 64))
            folded = part if folded is None else [a + b for a, b in zip(folded, part)]
        mine = stored[f"{layer}/{weight}"]
        np.testing.assert_allclose(mine["gradient"], folded[0] / 256, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mine["hessian_diagonal"], folded[1] / 256, rtol=1e-6, atol=1e-14)
        weights = job.model.get_layer(layer).get_weights()[0 if weight == "kernel" else 1].astype(np.float64)
        np.testing.assert_array_equal(mine["saliency"], 0.5 * mine["hessian_diagonal"] * weights**2)
    diagonal, gradient = stored["block2_conv1/kernel"]["hessian_diagonal"], stored["block2_conv1/kernel"]["gradient"]
    exact = layer_derivatives(job.model, "block2_conv1", x, y, engine="exact", out_channels=slice(20, 22), **options)
    np.testing.assert_allclose(diagonal[..., 20:22], exact.hessian_diagonal, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(gradient[..., 20:22], exact.gradient, rtol=1e-5, atol=1e-9)
    assert exact.hessian_diagonal.std() > 0
    store = ResultStore.open(str(path), mode="r")
    attrs = store.attrs
    assert attrs["complete"] is True and attrs["targets"] == ["block2_conv1/kernel", "block2_conv1/bias", "fc1/kernel"]
    assert attrs["config_fingerprint"] == config.fingerprint() and len(attrs["model_fingerprint"]) == 64
    assert attrs["validation"]["passed"] is True and attrs["validation"]["samples"] == 8
    assert attrs["validation"]["max_rel_error"] < 1e-3
    for name in attrs["targets"]:
        facts = store.tensor_attrs(name)
        assert facts["engine"] == "factored" and facts["validation"]["samples"] >= 2
        assert facts["validation"]["spot_check"]["passed"] is True
        assert facts["validation"]["spot_check"]["precision"] == "float64"
        assert facts["trace"] == pytest.approx(float(np.sum(stored[name]["hessian_diagonal"])), rel=1e-12)
        np.testing.assert_allclose(stored[name]["channel_trace"].sum(), facts["trace"], rtol=1e-10)


def test_datatree_and_load_result_read_the_store(reference):
    import pipeline

    _, _, path = reference
    tree = xr.open_datatree(str(path), engine="zarr", consolidated=False)
    kernel = tree["params/block2_conv1/kernel"]
    assert kernel["gradient"].dims == ("kh", "kw", "in_channel", "out_channel")
    assert kernel["hessian_diagonal"].shape == (3, 3, 32, 64) and kernel["channel_trace"].dims == ("out_channel",)
    assert tree["params/fc1/kernel"]["saliency"].dims == ("in_feature", "out_channel")
    assert kernel.attrs["engine"] == "factored"
    result = pipeline.load_result(str(path))
    assert list(result) == ["block2_conv1/kernel", "block2_conv1/bias", "fc1/kernel"]
    np.testing.assert_array_equal(result["block2_conv1/bias"].hessian_diagonal, tree["params/block2_conv1/bias"]["hessian_diagonal"].values)
    assert result["fc1/kernel"].dims == ("in_feature", "out_channel") and result["fc1/kernel"].attrs["engine"] == "factored"


@pytest.mark.parametrize("cluster", [{"num_workers": 1}, {"executor": "local"}], ids=["one_actor", "local_executor"])
def test_result_is_bit_identical_whatever_runs_it(reference, tmp_path, cluster):
    _, _, path = reference
    run(config_of(tmp_path / "s.zarr", cluster=cluster, validation={"samples": 0}), live=False)
    assert_same_results(tmp_path / "s.zarr", path)


def test_killed_actor_mid_shard_is_retried_bit_identical(reference, tmp_path):
    import ray

    _, _, path = reference
    config = config_of(tmp_path / "s.zarr", validation={"samples": 0})
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
    assert_same_results(tmp_path / "s.zarr", path)


def test_driver_sigkill_mid_unit_then_rerun_finishes_only_missing_units(reference, tmp_path):
    _, _, path = reference
    out = tmp_path / "s.zarr"
    config_path = write_config(tmp_path / "c.yaml", raw_of(out, validation={"samples": 0}))
    kill_driver_when(start_driver(config_path), lambda: recorded_units(out) >= 1)
    done_before = set(ResultStore.open(str(out), mode="r").unit_records())
    assert 1 <= len(done_before) < 4
    assert ResultStore.open(str(out), mode="r").lock_info() is not None  # left behind by the killed driver
    result = run(config_of(out, validation={"samples": 0}), live=False)
    assert done_before <= set(result.skipped) and not set(result.computed) & set(result.skipped)
    assert sorted(result.computed + result.skipped) == UNITS
    assert_same_results(out, path)


def test_corrupted_and_deleted_chunks_are_detected_then_recomputed(reference, tmp_path, capsys):
    from pipeline.cli import main

    _, _, path = reference
    out = tmp_path / "s.zarr"
    shutil.copytree(path, out)
    kernel = out / "params" / "block2_conv1" / "kernel"
    (kernel / "hessian_diagonal" / "c" / "0" / "0" / "0" / "5").write_bytes(b"garbage")
    (out / "params" / "fc1" / "kernel" / "gradient" / "c" / "0" / "11").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(out), "--json"])
    assert exit_info.value.code == 0
    status = __import__("json").loads(capsys.readouterr().out)
    assert status["corrupt"] == ["t0000-s00005", "t0002-s00011"] and status["complete"] is False
    assert status["shards_done"] == status["shards_total"] - 2
    assert status["units_done"] == 0  # the shared pass's shards are not all sound: its units must run again
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(out)])
    assert exit_info.value.code == 3
    result = run(config_of(out), live=False)
    assert sorted(result.computed) == UNITS and result.recomputed_corrupt == ["t0000-s00005", "t0002-s00011"]
    assert_same_results(out, path)
