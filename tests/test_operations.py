"""Operating a run: signals stop it cleanly wherever they land, stale Ray state is ignored, and no path shows a traceback."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.coordinator import run
from pipeline.errors import Interrupted
from pipeline.stop_signals import deferred, install_stop_handlers, raise_if_stopped, restore_handlers
from pipeline.store import ResultStore
from tests.stores import assert_same_results
from tests.cluster import free_port, kill_group, recorded_units
from tests.conftest import tiny_config, tiny_raw, write_config
from tests.slow_loading import MARK, save_model

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
# Factored units of about 1.5 s each on 2 cores: 100 classes, 6 units of 16 examples.
SLOW = {
    "model": {"builder": "cifar_vgg100"},
    "data": {"source": "synthetic", "num_examples": 96, "batch_size": 16},
    "loss": {"from_logits": True},
    "compute": {"engine": "factored", "example_block": 16},
    "validation": {"samples": 0},
}


# Exact-engine units of seconds each (about 1.5 s on an idle core, several on a busy machine), so that a
# signal lands while the driver waits inside ray.wait; one actor keeps start-up short.
EXACT = {
    "target": {"layer": "block2_conv2"},
    "data": {"num_examples": 512, "batch_size": 32},
    "compute": {"engine": "exact", "shard_size": 64, "chunk_size": 64, "example_block": 128},
    "cluster": {"num_workers": 1},
    "validation": {"samples": 4},
}
UNITS = 4


def hessdiag(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run(tiny_config(path, **SLOW, cluster={"executor": "local"}), live=False)
    return path


@pytest.fixture(scope="module")
def exact_reference(tmp_path_factory):
    """The uninterrupted EXACT run (in this process), validation not run."""
    path = tmp_path_factory.mktemp("exact") / "ref.zarr"
    run(tiny_config(path, **{**EXACT, "validation": {"samples": 0}, "cluster": {"executor": "local"}}), live=False)
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


def test_inside_deferred_a_stop_signal_is_raised_when_the_block_ends():
    saved = install_stop_handlers()
    try:
        reached = False
        with pytest.raises(Interrupted) as info:
            with deferred():  # as around a call into Ray's C code, which cannot take the exception
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler ran meanwhile and only recorded the signal
                reached = True
        assert reached and info.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # while stopping, later signals are recorded, not raised
        time.sleep(0.2)
        with pytest.raises(Interrupted) as info:
            raise_if_stopped()
        assert info.value.exit_code == 143
    finally:
        restore_handlers(saved)
    raise_if_stopped()


FINALIZER_SIGNALLED = """
import os, signal, time
from pipeline.errors import Interrupted
from pipeline.stop_signals import install_stop_handlers, raise_if_stopped

class SignalledOnCollection:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, inside the finalizer, where its exception cannot propagate

install_stop_handlers()
SignalledOnCollection()  # collected at once
try:
    raise_if_stopped()
except Interrupted as stop:
    print(stop.exit_code)
"""


def test_a_stop_signal_in_a_finalizer_is_not_printed_and_is_raised_later():
    """As in TensorFlow's callbacks from C code, where Python prints a swallowed ``Interrupted`` with its traceback."""
    done = subprocess.run([sys.executable, "-c", FINALIZER_SIGNALLED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "143", done.stdout + done.stderr
    assert done.stderr == "", done.stderr


def _sleep(seconds):
    time.sleep(seconds)


def test_ray_wait_inside_deferred_returns_and_the_signal_is_raised_after_it(ray_session):
    """Raised by the handler inside ray.wait, ``Interrupted`` would come out as ``SystemError: <cyfunction
    CoreWorker.wait ...> returned a result with an exception set``: Ray checks for signals while it waits."""
    ray = ray_session
    ref = ray.remote(_sleep).remote(60)
    saved = install_stop_handlers()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        returned = None
        with pytest.raises(Interrupted):
            with deferred():
                returned = ray.wait([ref], timeout=2.0)
        assert returned == ([], [ref])
    finally:
        restore_handlers(saved)
        ray.cancel(ref, force=True)


def signal_run_when(config: str, ready, signum: int, delay: float = 0.0, env: dict | None = None, timeout: float = 240):
    """`hessdiag run CONFIG`, sent ``signum`` ``delay`` s after ``ready(stderr lines so far)`` holds.

    Returns the exit code and the stderr lines; fails if the run ends before the signal.
    """
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []

    def read():
        for line in process.stderr:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + timeout
        while process.poll() is None and time.time() < deadline and not ready(lines):
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the signal:\n" + "\n".join(lines[-30:])
        time.sleep(delay)
        os.kill(process.pid, signum)
        process.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        kill_group(process.pid)
    return process.returncode, lines


def line(text: str):
    return lambda lines: any(text in one for one in lines)


def assert_stopped(code: int, lines: list[str], expected_code: int, counts: str | None, store) -> None:
    """The exit code, the one `interrupted` line last (with ``N of M units done`` or none), no traceback, the lock released."""
    err = "\n".join(lines)
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in err and not any(one.startswith("error: ") for one in lines), err[-3000:]
    middle = f"{counts} units done; " if counts else ""
    assert lines[-1] == f"interrupted; {middle}rerun the same command to resume", lines[-1]
    if ResultStore.exists(str(store)):
        assert ResultStore.open(str(store), mode="r").lock_info() is None


def test_a_signal_while_the_model_loads(tmp_path):
    out = tmp_path / "s.zarr"
    raw = tiny_raw(out, model={"source": "keras_file", "path": save_model(tmp_path / "m.keras"), "builder": None,
                               "custom_objects": ["tests.slow_loading:SlowToLoad"]},
                   target={"layer": "dense1"}, compute={"engine": "exact"}, validation={"samples": 0})
    mark = tmp_path / "loading"
    code, lines = signal_run_when(write_config(tmp_path / "c.yaml", raw), lambda _: mark.exists(), signal.SIGINT,
                                  env={MARK: str(mark)})
    assert_stopped(code, lines, 130, None, out)
    assert not out.exists()


def test_a_signal_during_calibration(tmp_path):
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, **{**EXACT, "compute": {**EXACT["compute"], "example_block": "auto"}}))
    code, lines = signal_run_when(config, line("example_block auto: timing"), signal.SIGTERM)
    assert_stopped(code, lines, 143, None, out)
    assert not out.exists()


def test_a_signal_while_ray_starts(tmp_path):
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, **EXACT))
    # 2 s into ray.init, which would by then have installed its own SIGTERM handlers (the driver's exits 15)
    code, lines = signal_run_when(config, line("units to run"), signal.SIGTERM, delay=2.0)
    assert_stopped(code, lines, 143, f"0 of {UNITS}", out)
    assert not ResultStore.open(str(out), mode="r").unit_records()


def test_a_signal_while_units_run_and_the_rerun_resumes(exact_reference, tmp_path):
    """Units take seconds: the signal lands while the driver waits inside ray.wait."""
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, **EXACT))
    code, lines = signal_run_when(config, lambda _: recorded_units(out) >= 1, signal.SIGTERM, delay=1.0)
    done = int(lines[-1].split()[1]) if lines and lines[-1].startswith("interrupted; ") else -1
    assert_stopped(code, lines, 143, f"{done} of {UNITS}", out)
    # a unit is done once its checksummed partial sums are in the store; the driver's timing record follows, so the
    # signal may land between the two (then the records count one fewer)
    assert 1 <= done < UNITS and done - 1 <= len(ResultStore.open(str(out), mode="r").unit_records()) <= done
    result = run(tiny_config(out, **{**EXACT, "cluster": {"executor": "local"}}), live=False)
    assert len(result.skipped) == done and len(result.computed) == UNITS - done and result.passed
    assert_same_results(out, exact_reference)


def test_a_signal_during_validation_and_the_rerun_validates(exact_reference, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(exact_reference, out)  # every unit done: the run goes straight to validation
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, **EXACT))
    code, lines = signal_run_when(config, line("all units done and folded"), signal.SIGTERM)
    assert_stopped(code, lines, 143, f"{UNITS} of {UNITS}", out)
    assert ResultStore.open(str(out), mode="r").attrs["validation"]["samples"] == 0  # validation did not finish
    result = run(tiny_config(out, **{**EXACT, "cluster": {"executor": "local"}}), live=False)
    assert not result.computed and result.passed and result.validation["samples"] == EXACT["validation"]["samples"]
    assert_same_results(out, exact_reference)


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
