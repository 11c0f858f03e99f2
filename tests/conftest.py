import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Credentials for the S3 test server, set before Ray starts so that its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "hessdiag-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "hessdiag-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import parse_config  # noqa: E402
from pipeline.worker import configure_tensorflow  # noqa: E402

# The same TensorFlow settings as every worker (cpus_per_worker: 1), so in-process
# results can be compared with Ray results bit for bit.
configure_tensorflow(threads=1)

TINY = {
    "model": {"source": "builder", "builder": "digits_vgg", "seed": 0},
    "target": {"layer": "block2_conv1"},
    "data": {"source": "digits", "num_examples": 256, "batch_size": 64},
    "loss": {"name": "sparse_categorical_crossentropy", "from_logits": False},
    "compute": {"engine": "auto", "shard_size": 4, "example_block": 64},
    "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_retries": 2},
    "validation": {"samples": 8, "rtol": 1e-3},
}


def tiny_raw(output, **sections):
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    raw["output"] = str(output)
    return raw


def tiny_config(output, **sections):
    return parse_config(tiny_raw(output, **sections))


def write_config(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


FINISHED = dict(target=None, targets="all", compute={"shard_size": 32}, cluster={"executor": "local"}, validation={"samples": 4})


@pytest.fixture(scope="session")
def finished_store(tmp_path_factory):
    """A small complete, validated store of every tensor of the digits CNN (local executor, shards of 32 channels)."""
    from pipeline.coordinator import run

    path = tmp_path_factory.mktemp("done") / "s.zarr"
    run(tiny_config(path, **FINISHED), live=False)
    return path
