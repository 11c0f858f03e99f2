"""A unit worker: loads the model once, then computes work units and writes their partial sums.

The same class runs in-process (the local executor) and as a Ray actor, one
per GPU when there are GPUs. Every worker uses the same TensorFlow thread
settings and deterministic ops, so a shard's bits do not depend on which
worker, or how many, computed it.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from typing import TYPE_CHECKING

from pipeline.config import Config, parse_config
from pipeline.logs import DEBUG, TF_LOG_LEVEL, verbose
from pipeline.plan import Unit
from pipeline.store import ResultStore

if TYPE_CHECKING:
    from pipeline.job import Job


def worker_environment() -> dict[str, str]:
    """Environment a worker process needs before TensorFlow is imported, for Ray actors and jobs:
    this process's log settings (quiet TensorFlow, or ``HESSDIAG_DEBUG`` when verbose), and its
    ``TF_ENABLE_ONEDNN_OPTS`` when set (``0`` trades CPU speed for TensorFlow's own kernels, which
    round less than oneDNN's)."""
    environment = {}
    if verbose():
        environment[DEBUG] = "1"
    level = os.environ.get(TF_LOG_LEVEL) or (None if verbose() else "3")
    if level is not None:
        environment[TF_LOG_LEVEL] = level
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        environment["TF_ENABLE_ONEDNN_OPTS"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
    return environment


def configure_tensorflow(threads: int) -> list[str]:
    """Thread pools, deterministic ops, full float32 and GPU memory growth; returns visible GPU names.

    TensorFloat-32 (on by default on NVIDIA Ampere and later) rounds matrix-product and convolution
    inputs to 10-bit mantissas, which no exact result can afford: it is switched off.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already initialized in this process (the local executor): keep its pools
    tf.config.experimental.enable_op_determinism()
    return [gpu.name for gpu in gpus]


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process, and of the GPU when one is used."""
    peaks = {"host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        peaks["gpu_peak_bytes"] = int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    return peaks


class UnitWorker:
    """Holds one model and a data source for its lifetime; computes units on request."""

    def __init__(self, config: Config | dict, threads: int = 1, job: Job | None = None):
        self.gpus = configure_tensorflow(threads)
        from pipeline.job import Job

        self.config = config if isinstance(config, Config) else parse_config(config)
        self.job = job if job is not None else Job.load(self.config)
        self.store = ResultStore.open(self.config.output, self.config.storage_options)

    def identity(self) -> dict:
        """Where this worker runs and which model it holds."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": self.gpus,
            "model_fingerprint": self.job.model_fingerprint,
        }

    def run_unit(self, unit: Unit) -> dict:
        """Compute a unit, write its partial sums, and return their verified checksum with timings."""
        started = time.perf_counter()
        sums = self.job.compute_unit(unit)
        checksum = self.store.write_sums("partials", unit.name, sums.items())
        record = {
            "checksum": checksum,
            "seconds": time.perf_counter() - started,
            "examples": unit.examples,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **peak_memory_bytes(),
        }
        if unit.tensor is None:
            return record
        name = self.job.targets[unit.tensor].name
        compiler = self.job.curvature.hvp_compiler(name)  # what this worker ran, after any fallback from XLA
        if compiler is not None:
            record["hvp_compiler"] = compiler
        stderr = self.job.curvature.stderr(name)
        if stderr is not None:
            record["max_stderr"] = float(stderr.max()) / self.job.examples
        return record
