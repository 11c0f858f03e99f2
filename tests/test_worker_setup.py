"""Worker processes compute in full float32: TensorFloat-32 off, and the driver's oneDNN choice
(TensorFlow reads it once, at import) passed on to Ray actors and submitted jobs."""

import shutil

import tensorflow as tf

from pipeline.submit import job_spec
from pipeline.worker import configure_tensorflow, worker_environment
from tests.conftest import tiny_raw, write_config


def test_tensor_float_32_is_off_in_configured_processes():
    tf.config.experimental.enable_tensor_float_32_execution(True)
    configure_tensorflow(threads=1)
    assert not tf.config.experimental.tensor_float_32_execution_enabled()


def test_the_onednn_choice_reaches_actors_and_jobs(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert "TF_ENABLE_ONEDNN_OPTS" not in worker_environment()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert worker_environment()["TF_ENABLE_ONEDNN_OPTS"] == "0"
    _, runtime_env, staging = job_spec(write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr")), [], pip=False)
    shutil.rmtree(staging)
    assert runtime_env["env_vars"]["TF_ENABLE_ONEDNN_OPTS"] == "0"
