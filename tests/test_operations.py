"""Operating a run: signals stop it cleanly, stale Ray state is ignored, and no path shows a traceback."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.coordinator import run
from pipeline.errors import Interrupted
from pipeline.stop_signals import install_stop_handlers, raise_if_stopped, restore_handlers
from pipeline.store import ResultStore
from tests.stores import assert_same_results
from tests.cluster import free_port, kill_group, recorded_units
from tests.conftest import tiny_config, tiny_raw, write_config

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
# Units slow enough (about 1.5 s each on 2 cores) to signal a run between them: 100 classes, 6 units of 16 examples.
SLOW = {
    "model": {"builder": "cifar_vgg100"},
    "data": {"source": "synthetic", "num_examples": 96, "batch_size": 16},
    "loss": {"from_logits": True},
    "compute": {"engine": "factored", "example_block": 16},
    "validation": {"samples": 0},
}


def hessdiag(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run(tiny_config(path, **SLOW, cluster={"executor": "local"}), live=False)
    return path


def test_a_stop_signal_is_not_swallowed_by_code_that_catches_any_exception():
    saved = install_stop_handlers()
    try:
        with pytest.raises(Interrupted):
            try:  # as store code does when it reads "any exception" as "this chunk is unreadable"
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:  # noqa: BLE001
                pass
        with pytest.raises(Interrupted):  # and the executors see it again between units
            raise_if_stopped()
    finally:
        restore_handlers(saved)
    raise_if_stopped()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_run_cleanly_and_rerun_resumes(reference, tmp_path, signum, code):
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, **SLOW))
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while recorded_units(out) < 1 and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the signal"
        os.kill(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        kill_group(process.pid)
    assert process.returncode == code, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; ") and last.endswith(" of 6 units done; rerun the same command to resume"), last
    done = int(last.split()[1])
    assert "Traceback" not in err
    opened = ResultStore.open(str(out), mode="r")
    assert opened.lock_info() is None and 1 <= len(opened.unit_records()) <= done < 6
    if signum == signal.SIGTERM:
        result = run(tiny_config(out, **SLOW), live=False)
        assert len(result.skipped) >= done and len(result.computed) + len(result.skipped) == 6
        assert_same_results(out, reference)


def test_stale_latest_cluster_file_does_not_stop_a_local_run(reference, tmp_path):
    saved = RAY_CURRENT_CLUSTER.read_text() if RAY_CURRENT_CLUSTER.exists() else None
    RAY_CURRENT_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    RAY_CURRENT_CLUSTER.write_text(f"127.0.0.1:{free_port()}")  # a head that died without `ray stop`
    try:
        out = tmp_path / "s.zarr"
        done = hessdiag("run", write_config(tmp_path / "c.yaml", tiny_raw(out, **SLOW)), timeout=300)
    finally:
        if saved is None:
            RAY_CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            RAY_CURRENT_CLUSTER.write_text(saved)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(out, reference)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_environment_gives_one_line_and_no_traceback(tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}"
    config = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr"))
    (tmp_path / "not_a_store").mkdir()
    cases = [
        (("run", str(tmp_path / "missing.yaml")), 2),
        (("submit", config, "--address", dead), 2),
        (("status", "raysubmit_x", "--address", dead), 2),
        (("status", str(tmp_path / "not_a_store")), 2),
        (("validate", str(tmp_path / "nowhere.zarr")), 2),
        (("report", str(tmp_path / "nowhere.zarr")), 2),
        (("status", str(tmp_path / "s.zarr"), "--storage-options", "{not json"), 2),
    ]
    for args, code in cases:
        done = hessdiag(*args, timeout=120)
        assert done.returncode == code, (args, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        assert done.stderr.strip(), args
