"""A real two-node Ray cluster on this machine: job submission, spread placement, node loss."""

import os
import re
import subprocess
import sys
import time

import pytest

from pipeline.coordinator import run
from pipeline.store import ResultStore
from tests.stores import assert_same_results
from tests.cluster import LocalCluster, cluster_env
from tests.conftest import tiny_config, tiny_raw, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster()
    try:
        local.start_head()
        local.worker_group = local.add_node()
        deadline = time.time() + 60
        while local.alive_nodes() < 2 and time.time() < deadline:
            time.sleep(1)
        yield local
    finally:
        local.stop()


def hessdiag(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """An undisturbed run submitted as a Ray job to the two-node cluster."""
    root = tmp_path_factory.mktemp("job")
    out = root / "s.zarr"
    config = write_config(root / "c.yaml", tiny_raw(out, data={"num_examples": 768}, validation={"samples": 4}))
    done = hessdiag("submit", config, "--address", cluster.dashboard, "--follow", env=cluster.env)
    return done, out


def test_submitted_job_succeeds_spread_over_both_nodes(submitted, cluster):
    done, out = submitted
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted job raysubmit_" in done.stdout and "SUCCEEDED" in done.stdout
    assert "2 actors x (1 CPU, 0 GPU) on 1 node(s)" in done.stdout  # both nodes share this host name
    assert not done.stderr.strip(), done.stderr[-3000:]  # no Ray lines ("Uploading package ...") from `submit`
    tensorflow = [line for line in done.stdout.splitlines() if re.match(r"[IWEF]\d{4} |WARNING: All log messages", line)]
    assert not tensorflow, tensorflow[:5]  # nor TensorFlow's from the job's driver
    attrs = ResultStore.open(str(out), mode="r").attrs
    assert attrs["complete"] is True and attrs["validation"]["passed"] is True
    pids = {entry["pid"] for entry in ResultStore.open(str(out), mode="r").unit_records().values()}
    assert len(pids) == 2  # one actor per node: each node has one CPU
    local = out.parent / "local.zarr"  # the same config run in this process, without Ray: the same bits
    run(tiny_config(local, data={"num_examples": 768}, cluster={"executor": "local"}, validation={"samples": 0}), live=False)
    assert_same_results(out, local)
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    status = hessdiag("status", job_id, "--address", cluster.dashboard, "--json", env=cluster.env)
    assert '"status": "SUCCEEDED"' in status.stdout


def test_failing_job_reports_error_and_exit_status(cluster, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr", target={"layer": "no_such_layer"}))
    done = hessdiag("submit", config, "--address", cluster.dashboard, "--follow", env=cluster.env)
    assert done.returncode == 2, done.stdout[-3000:]
    assert "layer 'no_such_layer' not found; layers are:" in done.stdout and "FAILED" in done.stdout
    assert not (tmp_path / "s.zarr").exists()


def test_malformed_config_is_refused_before_submission(cluster, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output: [\n")
    done = hessdiag("submit", str(config), "--address", cluster.dashboard, env=cluster.env)
    assert done.returncode == 2 and "is not valid YAML" in done.stderr and "submitted job" not in done.stdout


def test_submit_without_a_token_says_how_to_provide_one(cluster, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr"))
    env = {**cluster_env(), "HOME": str(tmp_path)}  # no token anywhere Ray looks
    for args in (("submit", config, "--address", cluster.dashboard), ("status", "raysubmit_x", "--address", cluster.dashboard)):
        done = hessdiag(*args, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "requires an authentication token" in done.stderr and "RAY_AUTH_TOKEN_PATH" in done.stderr
        assert "Traceback" not in done.stderr and "submitted job" not in done.stdout


def test_node_killed_mid_run_costs_only_its_shards(submitted, cluster, tmp_path):
    _, reference = submitted
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, data={"num_examples": 768}, validation={"samples": 0}))
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config, "--set", f"cluster.address={cluster.address}"],
                               env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if ResultStore.exists(str(out)) and len(ResultStore.open(str(out), mode="r").unit_records()) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the node could be killed: " + process.communicate()[0][-3000:]
    cluster.kill_node(cluster.worker_group)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "will be retried" in output
    assert_same_results(out, reference)
    assert os.path.isdir(out)
