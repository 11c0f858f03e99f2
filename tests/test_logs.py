"""Quiet start-up: a command's stderr holds hessdiag's own lines only, unless --verbose or HESSDIAG_DEBUG=1."""

import os
import re
import subprocess
import sys

from pipeline.worker import worker_environment
from tests.conftest import tiny_raw, write_config

# what TensorFlow (absl, C++ logging), Ray and Python warnings print, and hessdiag never does
FOREIGN = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages|.*Token authentication|.*oneDNN|.*cuda|.*Warning:)", re.IGNORECASE)


def hessdiag(*args, env):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300, env=env)


def test_commands_print_only_their_own_lines_unless_verbose(tmp_path):
    home = tmp_path / "home"  # a machine where Ray has not yet made a token: Ray would announce the one it makes
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_CPP_MIN_LOG_LEVEL", "HESSDIAG_DEBUG") and not key.startswith("RAY_AUTH_")}
    env["HOME"] = str(home)
    out = tmp_path / "s.zarr"
    config = write_config(tmp_path / "c.yaml", tiny_raw(out, data={"num_examples": 64}, cluster={"num_workers": 1},
                                                        validation={"samples": 2}))
    calls = {
        "run": hessdiag("run", config, env=env),
        "status": hessdiag("status", str(out), env=env),
        "validate": hessdiag("validate", str(out), "--samples", "1", env=env),
        "report": hessdiag("report", str(out), "--out", str(tmp_path / "report"), env=env),
    }
    for name, done in calls.items():
        assert done.returncode == 0, (name, done.stderr[-3000:])
        foreign = [line for line in done.stderr.splitlines() if not line.startswith("[hessdiag ")]
        foreign += [line for line in done.stdout.splitlines() if FOREIGN.match(line)]
        assert not foreign, (name, foreign[:10])
    assert "all units done and folded" in calls["run"].stderr and "validation" in calls["run"].stdout
    assert "1/1 units done" in calls["status"].stdout
    assert (home / ".ray" / "auth_token").is_file()  # token authentication stayed on: Ray made a token

    loud = hessdiag("validate", str(out), "--samples", "1", "--verbose", env=env)  # = HESSDIAG_DEBUG=1
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert any(FOREIGN.match(line) for line in loud.stderr.splitlines()), loud.stderr[-3000:]


def test_ray_actors_and_jobs_get_the_log_settings(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("HESSDIAG_DEBUG", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert worker_environment()["TF_CPP_MIN_LOG_LEVEL"] == "3" and "HESSDIAG_DEBUG" not in worker_environment()
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # the user's choice is kept
    assert worker_environment()["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.setenv("HESSDIAG_DEBUG", "1")
    assert worker_environment() == {"HESSDIAG_DEBUG": "1"}
