"""A real S3-compatible server (moto in server mode on 127.0.0.1) as the output store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest

from pipeline.coordinator import run
from pipeline.store import ResultStore
from tests.stores import assert_same_results
from tests.cluster import free_port, kill_driver_when, start_driver
from tests.conftest import tiny_config, tiny_raw, write_config

pytestmark = pytest.mark.slow
BUCKET = "hessdiag-results"


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - server still starting
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield client, {"endpoint_url": endpoint}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


SLOWER = {"num_examples": 512}  # 8 units: enough to kill a run between them
UNITS = [f"s-b{b:05d}" for b in range(8)]


def s3_config(name, options, **sections):
    return tiny_config(f"s3://{BUCKET}/{name}.zarr", storage_options=options, data=SLOWER, **sections)


def recorded_units(client, name):
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{name}.zarr/units/s")  # not the parent group's own zarr.json
    return [item["Key"] for item in listing.get("Contents", []) if item["Key"].endswith("zarr.json")]


@pytest.fixture(scope="module")
def s3_run(s3, ray_session, tmp_path_factory):
    client, options = s3
    config = s3_config("full", options, validation={"samples": 4})
    return run(config, live=False), config


def test_end_to_end_on_s3_matches_local_disk_and_keeps_no_secrets(s3, s3_run, tmp_path):
    client, options = s3
    result, config = s3_run
    assert result.passed and sorted(result.computed) == UNITS
    local = tiny_config(tmp_path / "local.zarr", data=SLOWER, cluster={"executor": "local"}, validation={"samples": 0})
    run(local, live=False)
    assert_same_results(config.output, tmp_path / "local.zarr", options)
    everything = b"".join(
        client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for item in client.list_objects_v2(Bucket=BUCKET, Prefix="full.zarr")["Contents"]
        if item["Key"].endswith("zarr.json")
    )
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in everything
    assert b"endpoint_url" not in everything
    assert "storage_options" not in ResultStore.open(config.output, options, mode="r").attrs["config"]


def test_driver_killed_then_resumed_on_s3(s3, s3_run, tmp_path):
    client, options = s3
    _, full = s3_run
    url = f"s3://{BUCKET}/resumed.zarr"
    raw = tiny_raw(url, storage_options=options, data=SLOWER, validation={"samples": 0})
    config_path = write_config(tmp_path / "c.yaml", raw)
    kill_driver_when(start_driver(config_path), lambda: len(recorded_units(client, "resumed")) >= 1)
    before = set(ResultStore.open(url, options, mode="r").unit_records())
    assert 1 <= len(before) < 8
    result = run(s3_config("resumed", options, validation={"samples": 0}), live=False)
    assert before <= set(result.skipped) and sorted(result.computed + result.skipped) == UNITS
    assert_same_results(url, full.output, options, options)


def test_corrupted_object_is_detected_and_recomputed(s3, s3_run, capsys):
    from pipeline.cli import main

    client, options = s3
    _, full = s3_run
    client.put_object(Bucket=BUCKET, Key="full.zarr/params/block2_conv1/kernel/hessian_diagonal/c/0/0/0/6", Body=b"not a chunk")
    with pytest.raises(SystemExit):
        main(["status", full.output, "--json", "--storage-options", json.dumps(options)])
    status = json.loads(capsys.readouterr().out)
    assert status["corrupt"] == ["t0000-s00006"] and status["complete"] is False
    result = run(full, live=False)
    assert sorted(result.computed) == UNITS and result.recomputed_corrupt == ["t0000-s00006"] and result.passed
    store = ResultStore.open(full.output, options, mode="r")
    _, corrupt, missing = store.verify(store.plan)
    assert not corrupt and not missing


def test_zarr_data_set_on_s3_gives_the_same_store_as_npz(s3, tmp_path):
    import zarr

    from tests.test_data_sources import _digits_arrays

    _, options = s3
    x, y = _digits_arrays()
    group = zarr.open_group(f"s3://{BUCKET}/digits.zarr", mode="w", storage_options=options)
    group.create_array("x", data=x, chunks=(32, 8, 8, 1))
    group.create_array("y", data=y, chunks=(32,))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    stores = []
    for name, data in (("remote", {"source": "zarr", "path": f"s3://{BUCKET}/digits.zarr"}),
                       ("local", {"source": "npz", "path": str(tmp_path / "d.npz")})):
        out = tmp_path / f"{name}.zarr"
        config = tiny_config(out, storage_options=options, data={**data, "batch_size": 32},
                             compute={"example_block": 32}, cluster={"executor": "local"}, validation={"samples": 0})
        run(config, live=False)
        stores.append(out)
    assert_same_results(*stores)
